"""First Block Cache (ParaAttention, in diffusers as `FirstBlockCacheConfig`): run the first
transformer block every step; when its residual changed less than `threshold` (relative L1) since
the last full step, reuse the cached output of all the other blocks."""

from __future__ import annotations

from collections.abc import Mapping

from optsearch.accelerators.base import Param, bounds_of
from optsearch.accelerators.hooks import (
    cache_patch,
    denoisers,
    hooked_blocks,
    unregistered_block_problem,
)

NAME = "fbcache"
APPLIES_TO = ("transformer", "video")
PARAMS = (
    Param("threshold", float, (0.02, 0.5), minimum=0.0, grid_step=0.02, calibrated=True,
          help="relative change of the first block's residual under which the rest is reused"),
)


def problem_with(pipe, values: Mapping | None = None) -> str | None:
    """diffusers' FirstBlockCache needs its blocks registered (`unregistered_block_problem`), and
    adds the last block's cached residual to the first block's output, so both must return the
    image tokens alike. FLUX.2's first (double-stream) block returns text and image tokens apart,
    its last (single-stream) one their joined sequence: the first call fails ("unsupported
    operand type(s) for -: 'Tensor' and 'list'", diffusers 0.42.1, builtin:tiny-flux2)."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # another diffusers: its own hooks decide
        return None
    if problem := unregistered_block_problem(NAME, pipe):
        return problem
    for model in denoisers(pipe):
        blocks = hooked_blocks(model)
        if not blocks:  # enable_cache says so
            continue
        head, tail = (TransformerBlockRegistry.get(type(block)) for block in (blocks[0], blocks[-1]))
        apart = [meta.return_encoder_hidden_states_index is not None for meta in (head, tail)]
        if apart[0] != apart[1]:
            return (f"fbcache cannot run on {type(model).__name__}: diffusers' FirstBlockCache "
                    f"adds its last block's residual ({type(blocks[-1]).__name__}: text and "
                    f"image tokens joined) to its first block's output ({type(blocks[0]).__name__}:"
                    " apart); search dbcache instead (cache-dit's DBCache knows this model)")
    return None


class FirstBlockCachePatch:
    """diffusers' FirstBlockCache, recording at every step the relative residual change it
    compares with its threshold (what `calibrate` reads) and its decision (what ran). The
    recording runs in eager code, as diffusers' decision does: a compiled denoiser compiles what
    it would without us."""

    def __init__(self, pipe, threshold: float):
        import torch
        from diffusers import FirstBlockCacheConfig
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        self.patch = cache_patch(pipe, FirstBlockCacheConfig(threshold=threshold), NAME, count=False)
        self.changes: list[float] = []  # the relative residual changes compared with the threshold
        self.decisions: list[tuple[bool, int]] = []  # per head call: the others ran, how many
        for model in self.patch.modules:  # each expert (Wan 2.2's two) has its own head
            registries = [m.__dict__["_diffusers_hook"] for m in model.modules()
                          if "_diffusers_hook" in m.__dict__]
            blocks = sum(r.get_hook(_FBC_BLOCK_HOOK) is not None for r in registries)
            for head in (r.get_hook(_FBC_LEADER_BLOCK_HOOK) for r in registries):
                if head is not None:
                    decide = head._should_compute_remaining_blocks
                    head._should_compute_remaining_blocks = torch.compiler.disable(
                        lambda r, decide=decide, head=head, blocks=blocks:
                        self._record(decide(r), head, r, blocks))

    def _record(self, computed: bool, head, residual, blocks: int) -> bool:
        previous = head.state_manager.get_state().head_block_residual
        if previous is not None:  # diffusers' own measure: mean |change| / mean |previous|
            self.changes.append(float((residual - previous).abs().mean() / previous.abs().mean()))
        self.decisions.append((computed, blocks))
        return computed

    def prepare(self, call_kwargs: dict) -> None:
        self.decisions = []
        self.patch.prepare(call_kwargs)

    def computed_fraction(self) -> float | None:
        """The share of the hooked blocks' calls that ran: the head block at every call, the
        others (`blocks` of them in its expert) at the calls it decided to compute them."""
        if not self.decisions:
            return None
        ran = sum(1 + computed * blocks for computed, blocks in self.decisions)
        return ran / sum(1 + blocks for _, blocks in self.decisions)

    def restore(self) -> None:
        self.patch.restore()


def apply(pipe, threshold: float = 0.05, **_calibrated) -> FirstBlockCachePatch:
    return FirstBlockCachePatch(pipe, float(threshold))


def calibrate(pipe, run_once, searched=None, steps: int | None = None, call_kwargs=None) -> dict:
    """What an "auto" threshold range comes from: the relative changes of the first block's
    residual FirstBlockCache compares with its threshold, over one call that skips nothing, from
    "skips nothing" (their minimum) to "skips nearly everything" (their maximum). It has no
    warm-up to allow for (`searched` is unused): every step after the first compares. `steps`,
    the count `run_once` runs, needs no setting here (the hooks follow each call)."""
    patch = FirstBlockCachePatch(pipe, 0.0)
    try:
        run_once()
    finally:
        patch.restore()
    changes = sorted(patch.changes)
    if not changes:
        return {}
    return {"auto": {"threshold": bounds_of(changes[0], changes[-1])},
            "observed": {"min": changes[0], "median": changes[len(changes) // 2],
                         "max": changes[-1], "steps": len(changes)}}


def warmup_steps(**_) -> int:
    """The first step always computes; the next ones go through the compare-and-reuse path."""
    return 3
