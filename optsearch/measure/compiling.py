"""torch.compile as the server runs it: the denoiser compiled before the baseline, every setting
applied on top, and what compiling cost each measurement counted apart from its speedup.

`[model] compile = "regional"` compiles the denoiser's repeated blocks (diffusers'
`compile_repeated_blocks`: the transformer or UNet blocks), `"full"` the whole denoiser
(`nn.Module.compile`). Both with `fullgraph=False`: a cache's hook that torch cannot trace breaks
the graph (counted) instead of failing the call. Compilation happens in the untimed warm-up, which
is a full call for a compiled pipeline (every step's path compiled before timing); graphs compiled
after it, inside timed batches, are counted and flagged, since their seconds are in the figure.
"""

from __future__ import annotations

from optsearch.accelerators import denoiser
from optsearch.errors import ModelLoadError

CHOICES = ("none", "regional", "full")


def compile_denoiser(pipe, how: str, mode: str | None = None, backend: str = "inductor") -> None:
    """Compile `pipe`'s denoiser in place (lazily: the first call compiles) and mark the pipeline
    with how, which the device fingerprint takes in."""
    if how == "none":
        return
    model = denoiser(pipe)
    options = {"backend": backend, **({"mode": mode} if mode else {})}
    if how == "regional":
        if not getattr(model, "_repeated_blocks", None):
            raise ModelLoadError(f"model.compile = \"regional\": {type(model).__name__} names no "
                                 "repeated blocks (diffusers' _repeated_blocks); use \"full\"")
        model.compile_repeated_blocks(fullgraph=False, **options)
    else:
        model.compile(**options)
    pipe._optsearch_compile = f"{how}:{mode or 'default'}:{backend}"


def compiled_as(pipe) -> str | None:
    """'regional:default:inductor', or None for an eager pipeline."""
    return getattr(pipe, "_optsearch_compile", None)


def dynamo_counts() -> dict[str, int]:
    """torch's own running counts: graphs compiled and graph breaks met so far in this process."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def counted_since(before: dict[str, int], after: dict[str, int] | None = None) -> dict[str, int]:
    after = dynamo_counts() if after is None else after
    return {key: after[key] - before[key] for key in before}
