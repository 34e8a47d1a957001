"""The accelerator registry, the four combos of the original workflow, and applying a setting.

A *setting* is a nested dict: ``{"deepcache": {"cache_interval": 3}, "tome": {"ratio": 0.5}}``.
Accelerators always apply in the fixed order DeepCache -> ToMe -> T-GATE and restore in reverse,
because T-GATE drives an already-enabled DeepCache helper itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from . import deepcache, tgate, tome
from .base import Param

REGISTRY: dict[str, ModuleType] = {m.NAME: m for m in (deepcache, tome, tgate)}
ORDER = ("deepcache", "tome", "tgate")
COMBOS: tuple[tuple[str, ...], ...] = (
    ("deepcache",),
    ("deepcache", "tome"),
    ("deepcache", "tgate"),
    ("deepcache", "tome", "tgate"),
)


def params_of(name: str) -> dict[str, Param]:
    return {p.name: p for p in REGISTRY[name].PARAMS}


def combo_name(accelerators) -> str:
    """The canonical name of a combo, e.g. 'deepcache+tome'; 'baseline' when empty."""
    ordered = [name for name in ORDER if name in accelerators]
    return "+".join(ordered) or "baseline"


def normalize_setting(setting: Mapping) -> dict[str, dict]:
    """Accept a nested dict or a flat {'tome.ratio': 0.5} dict; check names, types and ranges."""
    nested: dict[str, dict] = {}
    for key, value in setting.items():
        if isinstance(value, Mapping):
            nested.setdefault(key, {}).update(value)
        elif "." in key:
            accelerator, _, param = key.partition(".")
            nested.setdefault(accelerator, {})[param] = value
        else:
            raise ValueError(f"setting key {key!r} is neither 'accelerator.param' nor a table")
    result: dict[str, dict] = {}
    for name in ORDER:
        if name not in nested:
            continue
        params = params_of(name)
        values = {}
        for param_name, value in nested.pop(name).items():
            if param_name not in params:
                raise ValueError(
                    f"unknown parameter {name}.{param_name} (allowed: {', '.join(params)})"
                )
            problem = params[param_name].check(value)
            if problem:
                raise ValueError(f"{name}.{param_name}={value!r} {problem}")
            values[param_name] = params[param_name].kind(value)
        result[name] = values
    if nested:
        raise ValueError(f"unknown accelerator {next(iter(nested))!r} (allowed: {', '.join(ORDER)})")
    return result


class AppliedSetting:
    """A setting applied to a pipeline. Call it like the pipeline; `restore()` undoes everything.

    Also a context manager: ``with optsearch.apply(pipe, params) as run: images = run(prompts)``.
    """

    def __init__(self, pipe, setting: Mapping):
        self.pipe = pipe
        self.setting = normalize_setting(setting)
        self._patches: list = []
        self._tome = self._tgate = None
        try:
            self._apply()
        except BaseException:
            self.restore()
            raise

    def _apply(self) -> None:
        helper = None
        if "deepcache" in self.setting:
            patch = deepcache.apply(self.pipe, **self.setting["deepcache"])
            self._patches.append(patch)
            helper = patch.helper
        if "tome" in self.setting:
            self._tome = tome.apply(self.pipe, **self.setting["tome"])
            self._patches.append(self._tome)
        if "tgate" in self.setting:
            self._tgate = tgate.apply(self.pipe, deepcache_helper=helper, **self.setting["tgate"])
            self._patches.append(self._tgate)

    @property
    def combo(self) -> str:
        return combo_name(self.setting)

    @property
    def warmup_steps(self) -> int:
        """Steps that take a call through every code path of the applied accelerators."""
        return max((REGISTRY[name].warmup_steps(**params) for name, params in self.setting.items()),
                   default=0)

    def reseed(self, seed: int) -> None:
        """Fix ToMe's random merge pattern for the next call (no-op without ToMe)."""
        if self._tome is not None:
            self._tome.reseed(seed)

    def __call__(self, *args, **kwargs):
        if self._tgate is not None:
            return self._tgate(*args, **kwargs)
        return self.pipe(*args, **kwargs)

    def restore(self) -> None:
        """Put the pipeline back exactly as it was, in reverse order of application."""
        while self._patches:
            self._patches.pop().restore()

    def __enter__(self) -> AppliedSetting:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_setting(pipe, setting: Mapping) -> AppliedSetting:
    return AppliedSetting(pipe, setting)
