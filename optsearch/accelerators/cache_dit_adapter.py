"""cache-dit's block adapter for a pipeline: which class it knows it by, how many blocks it
caches, and what building one leaves on the modules, so that it can be removed.

Building the adapter patches the transformer (an instance `forward`, flags, block lists
re-added), whether or not caching is then enabled: whoever builds one takes `LeftBehind` first.
"""

from __future__ import annotations

import weakref

from optsearch.accelerators.hooks import denoiser, denoisers


def adapter_builder(pipe):
    """How to get what `cache_dit.enable_cache` takes for `pipe` (building it patches the
    transformer: take `LeftBehind` first): the pipeline itself when cache-dit knows its class, else a
    BlockAdapter from the class it derives from or from its transformer's class. None when
    cache-dit knows neither."""
    from cache_dit import BlockAdapterRegister

    if BlockAdapterRegister.is_supported(pipe):
        return lambda: BlockAdapterRegister.get_adapter(pipe)
    transformer = denoiser(pipe)
    for klass in type(pipe).__mro__[1:]:
        for prefix, build in BlockAdapterRegister._adapters.items():  # class-name prefix -> builder
            if klass.__name__.startswith(prefix):
                return lambda build=build: build(pipe)
    if BlockAdapterRegister.is_supported(transformer):
        return lambda: BlockAdapterRegister.get_adapter(transformer)
    return None


def block_counts(adapter) -> dict[str, int]:
    """The blocks of each list a built adapter caches, by the list's name (one name, or one per
    list: FLUX's double- and single-stream blocks)."""
    names, lists = adapter.blocks_name, adapter.blocks
    pairs = zip(names, lists, strict=True) if isinstance(names, list) else [(names, lists)]
    return {name: len(blocks) for name, blocks in pairs}


# denoiser -> the blocks of the smallest list cache-dit caches in it; weak: it goes with its model
_BLOCK_COUNTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_block_count(pipe) -> int:
    """The blocks of the smallest block list cache-dit caches in this pipeline: the most
    Fn_compute_blocks or Bn_compute_blocks may be. Building cache-dit's adapter to count them
    patches the transformer (an instance forward, flags, block lists re-added): undone here."""
    model = denoiser(pipe)
    if model not in _BLOCK_COUNTS:
        left = LeftBehind(pipe)
        try:
            _BLOCK_COUNTS[model] = min(block_counts(adapter_builder(pipe)()).values())
        finally:
            left.remove()
    return _BLOCK_COUNTS[model]


class LeftBehind:
    """What cache-dit leaves on a pipeline's modules after its adapter is built (and disabled):
    an instance `forward` wrapping the class's, its patched flags, and its re-added block lists
    moved back into their places (diffusers' FirstBlockCache takes the first block it meets as
    the head). Taken before, removed by `remove()`."""

    def __init__(self, pipe):
        self.modules = [pipe, *(module for expert in denoisers(pipe) for module in expert.modules())]
        self.before = [set(vars(module)) for module in self.modules]
        self.order = [list(getattr(module, "_modules", {})) for module in self.modules]

    def remove(self) -> None:
        import torch

        for module, order in zip(self.modules, self.order, strict=True):
            children = getattr(module, "_modules", None)
            if children is not None and list(children) != order and set(order) <= set(children):
                rest = [name for name in children if name not in order]
                object.__setattr__(module, "_modules",
                                   {name: children[name] for name in [*order, *rest]})
        for module, before in zip(self.modules, self.before, strict=True):
            for name in set(vars(module)) - before:
                if not isinstance(getattr(module, name), torch.nn.Module | torch.Tensor):
                    delattr(module, name)


