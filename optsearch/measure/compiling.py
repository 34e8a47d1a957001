"""torch.compile as the server runs it: the denoiser compiled before the baseline, every setting
applied on top, and what compiling cost each measurement counted apart from its speedup.

`[model] compile = "regional"` compiles the denoiser's repeated blocks (diffusers'
`compile_repeated_blocks`: the transformer or UNet blocks), `"full"` the whole denoiser
(`nn.Module.compile`); a ControlNet beside it the same way. All with `fullgraph=False`: a
cache's hook that torch cannot trace breaks the graph (counted) instead of failing the call.
Compilation happens in the untimed warm-up, which is a full call for a compiled pipeline (every
step's path compiled before timing); graphs compiled after it, inside timed batches, are counted
and flagged, since their seconds are in the figure.
"""

from __future__ import annotations

import sys

from optsearch.accelerators import denoiser
from optsearch.accelerators.hooks import compiled_how, denoisers
from optsearch.errors import ModelLoadError, first_line


def compile_options_problem(backend: str, mode: str | None) -> str | None:
    """torch.compile's own word on a backend and mode, before any model is loaded: a wrapper is
    made (nothing compiles) and refused as torch refuses it. Imports torch._dynamo (seconds):
    `study create` asks only for a study that compiles, so no worker of it fails on a typo."""
    import torch

    try:
        torch.compile(lambda x: x, backend=backend, **({"mode": mode} if mode else {}))
    except Exception as error:  # InvalidBackend; RuntimeError "Unrecognized mode=..."
        key = "model.compile_backend" if type(error).__name__ == "InvalidBackend" \
            else "model.compile_mode"
        return f"{key}: {first_line(error)}"
    return None


def compile_denoiser(pipe, how: str, mode: str | None = None, backend: str = "inductor") -> None:
    """Compile `pipe`'s denoiser in place (lazily: the first call compiles) and mark the pipeline
    with how, which the device fingerprint takes in."""
    if how == "none":
        return
    problem = compile_options_problem(backend, mode)
    if problem:
        raise ModelLoadError(problem)
    options = {"backend": backend, **({"mode": mode} if mode else {})}
    for model in denoisers(pipe):  # Wan 2.2 A14B: both experts, as a server compiles them
        if how == "regional":
            if not getattr(model, "_repeated_blocks", None):
                raise ModelLoadError(f"model.compile = \"regional\": {type(model).__name__} names no "
                                     "repeated blocks (diffusers' _repeated_blocks); use \"full\"")
            model.compile_repeated_blocks(fullgraph=False, **options)
        else:
            model.compile(**options)
    if getattr(pipe, "controlnet", None) is not None:  # it runs beside the denoiser at every step
        compile_controlnet(pipe.controlnet, how, denoiser(pipe)._repeated_blocks, options)
    pipe._optsearch_compile = f"{how}:{mode or 'default'}:{backend}"


def compile_controlnet(controlnet, how: str, block_names: list[str], options: dict) -> None:
    """A ControlNet is served compiled as its denoiser is: it copies the denoiser's blocks, so
    "regional" compiles those (the denoiser's repeated block classes), "full" the whole network.
    Left eager, the ControlNet's share of every step was timed slower than the server runs it."""
    if how == "full":
        controlnet.compile(**options)
        return
    for block in controlnet.modules():
        if type(block).__name__ in block_names:
            block.compile(fullgraph=False, **options)


AS_BUILT = "as-built"  # the mode of a denoiser compiled before optsearch got it: not ours to know


def compiled_as(pipe) -> str | None:
    """'regional:default:inductor' ('regional:as-built' for one that came compiled), or None for
    an eager pipeline."""
    return getattr(pipe, "_optsearch_compile", None)


def adopt_compiled(pipe) -> str | None:
    """Mark a pipeline whose denoiser came compiled (a factory that compiles, as a server does, or
    a notebook's pipeline) as compiled, and return how: it is then timed as a compiled one (a full
    untimed call before each timing, compile counted apart, its own device fingerprint)."""
    how = compiled_how(denoiser(pipe))
    if how == "none":
        return None
    pipe._optsearch_compile = f"{how}:{AS_BUILT}"
    return how


def _dynamo_counts() -> tuple[int, int]:
    """torch's own running counts: (graphs compiled, graph breaks met) so far in this process.
    Imports torch._dynamo (about a second): only for compiled pipelines."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["graph_break"].values()))


def graphs_compiled() -> int:
    """Graphs torch compiled so far in this process (0 while nothing imported torch._dynamo)."""
    return _dynamo_counts()[0] if "torch._dynamo" in sys.modules else 0


class CompileCounter:
    """What torch compiled over one measurement: made at its start, told when its untimed warm-up
    ended (`warmed_up`), read at its end (`counts`)."""

    def __init__(self):
        self.start = self.warm = _dynamo_counts()

    def warmed_up(self) -> None:
        self.warm = _dynamo_counts()

    def counts(self) -> dict[str, int]:
        """graphs compiled in the warm-up, graphs compiled after it (inside timed calls), and
        graph breaks met over the whole measurement."""
        end = _dynamo_counts()
        return {"graphs_compiled": self.warm[0] - self.start[0],
                "compiled_while_timed": end[0] - self.warm[0],
                "graph_breaks": end[1] - self.start[1]}
