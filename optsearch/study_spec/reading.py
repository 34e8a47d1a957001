"""Reading a spec: TOML (or a stored dict) into a `StudySpec`, with every problem one line.

Every problem found names the file, the key, what is wrong and what is allowed; all are collected
before raising `SpecError`, so a user fixes a spec in one pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from optsearch.accelerators import ORDER, distill, params_of
from optsearch.errors import SpecError
from optsearch.measure.model_ids import is_factory
from optsearch.measure.prompts import is_folder
from optsearch.study_spec.checks import validate
from optsearch.study_spec.schema import (
    PROMPT_FILE_SUFFIXES,
    PROMPT_SOURCES,
    SECTIONS,
    SET_BY_OPTSEARCH,
    StudySpec,
)

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _expected_type(section: type, key: str) -> type | None:
    """The Python type a key holds (from its default), for type checking TOML values."""
    default = getattr(section(), key)
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float, str)):
        return float if isinstance(default, float) else type(default)
    hint = typing.get_type_hints(section).get(key)  # `int | None`: an optional key
    if isinstance(hint, types.UnionType):
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        return kinds[0] if len(kinds) == 1 and kinds[0] in _TYPE_NAMES else None
    return None


def _type_ok(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> StudySpec:
    """Read, validate and return a spec file. Raises SpecError with one line per problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError([f"{path}: spec file not found"]) from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError([f"{path}: not valid TOML: {error}"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError([f"{path}: cannot read spec: {error}"]) from None
    _resolve_paths(data, path.parent)
    spec = spec_from_dict(data, source=str(path), overrides=overrides)
    missing = [f"{path}: {key}: {'file' if _is_prompt_file(value) else 'folder'} {value} does not "
               "exist (relative paths are read from the spec's folder)"
               for key, value in _prompt_files(spec) if not _exists(value)]
    if missing:
        raise SpecError(missing)
    return spec


def _is_prompt_file(source: str) -> bool:
    return source not in PROMPT_SOURCES and source.lower().endswith(PROMPT_FILE_SUFFIXES)


def _is_prompt_path(source: str, folder: Path) -> bool:
    """A prompt file, or a folder of images with their prompts (relative to `folder`)."""
    return _is_prompt_file(source) or is_folder(source, folder)


def _prompt_files(spec: StudySpec) -> list[tuple[str, str]]:
    files = [("prompts.source", spec.prompts.source), ("confirm.source", spec.confirm.source)]
    return [(key, value) for key, value in files if value and _is_prompt_path(value, Path("."))]


def _exists(value: str) -> bool:
    return Path(value).is_file() if _is_prompt_file(value) else Path(value).is_dir()


def _resolve_paths(data: dict, folder: Path) -> None:
    """Make the relative paths a spec names (prompt files, the artifacts folder, a local model
    folder) absolute from the spec's own folder, so every worker reads the same files. The
    artifacts folder is `artifacts` beside the spec unless the spec names one: stored absolute,
    a dashboard or worker started anywhere finds the same images."""
    if isinstance(data.get("artifacts", {}), dict):
        data.setdefault("artifacts", {}).setdefault("path", "artifacts")

    def absolute(value, applies):
        if isinstance(value, list):  # several ControlNets or LoRAs
            return [absolute(item, applies) for item in value]
        if isinstance(value, str) and applies(value) and not Path(value).expanduser().is_absolute():
            slash = "/" if value.endswith(("/", "\\")) else ""  # a folder that is not there yet
            return str((folder / Path(value).expanduser()).resolve()) + slash
        return value

    def resolve(section: str, key: str, applies) -> None:
        table = data.get(section)
        if isinstance(table, dict) and key in table:
            table[key] = absolute(table[key], applies)

    resolve("prompts", "source", lambda value: _is_prompt_path(value, folder))
    resolve("confirm", "source", lambda value: _is_prompt_path(value, folder))
    resolve("artifacts", "path", lambda value: "://" not in value)
    resolve("model", "id", lambda value: value.startswith(("./", "../")))
    for key in ("lora", "controlnet"):  # local folders or files, beside the spec
        resolve("model", key, lambda value: value.startswith(("./", "../")))
    distill = data.get("space", {}).get("distill") if isinstance(data.get("space"), dict) else None
    recipes = distill.get("recipes") if isinstance(distill, dict) else None
    for table in [distill, *(recipes if isinstance(recipes, list) else [])]:
        if not isinstance(table, dict):
            continue
        for key in ("lora", "lora_2"):  # a name, or a list of them to search
            if key in table:
                table[key] = absolute(table[key], lambda value: value.startswith(("./", "../")))
        given = table.get("scheduler_config")
        if isinstance(given, (str, list)):  # one, or a list of them to search
            given = absolute(given, lambda value: not value.lstrip().startswith("{"))
            table["scheduler_config"] = [_inlined(item) for item in given] \
                if isinstance(given, list) else _inlined(given)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("id"), str) and is_factory(model["id"]):
        model.setdefault("factory_path", ".")
        resolve("model", "factory_path", lambda value: True)


def _inlined(scheduler_config):
    """A JSON file's object as its text, so the stored spec holds it (a worker on another
    machine has no file); as given where it is no such file, or no string (the checks say why)."""
    if not isinstance(scheduler_config, str):
        return scheduler_config
    try:
        return json.dumps(distill.scheduler_overrides(scheduler_config), sort_keys=True)
    except ValueError:
        return scheduler_config


def spec_from_dict(data: dict, source: str = "<spec>",
                   overrides: dict[str, Any] | None = None) -> StudySpec:
    """Build and validate a spec from a dict (a parsed TOML file, or one stored in a study)."""
    problems: list[str] = []
    spec = StudySpec(name=Path(source).stem if source != "<spec>" else "optsearch")
    wrong: set[str] = set()  # keys already reported: they kept their defaults

    def problem(key: str, message: str) -> None:
        wrong.add(key)
        problems.append(f"{source}: {key}: {message}")

    def cross_check(key: str, message: str) -> None:
        """A cross-field problem, unless its key was already reported (its default would be
        judged, a value the user never wrote)."""
        if key not in wrong:
            problems.append(f"{source}: {key}: {message}")

    for key, value in data.items():
        if key == "name":
            if isinstance(value, str) and value.strip():
                spec.name = value
            else:
                problem("name", "must be a non-empty string")
        elif key in SECTIONS:
            if not isinstance(value, dict):
                problem(key, f"must be a table [{key}]")
                continue
            _load_section(getattr(spec, key), key, value, problem)
        elif key == "space":
            if not isinstance(value, dict):
                problem("space", "must be tables [space.<accelerator>]")
                continue
            spec.space = _load_space(value, problem)
        else:
            problem(key, f"unknown key (allowed: name, {', '.join(SECTIONS)}, space)")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or key not in _keys(getattr(spec, section)):
            problem(dotted, "unknown key")
        else:
            _load_section(getattr(spec, section), section, {key: value}, problem)
    spec.search.model_kind = spec.model.pipeline_kind
    _one_scale_each(spec.model)
    validate(spec, cross_check)  # wrongly typed keys kept their defaults, so this is safe
    if problems:
        raise SpecError(problems)
    return spec


def _one_scale_each(model) -> None:
    """Several ControlNets take one conditioning scale each: a number (or none: 1.0) is given to
    each, as SD's pipelines do themselves and FLUX's and SD3's multi-ControlNet calls fail to
    (diffusers 0.42). The export's call then runs as measured."""
    if len(model.controlnets) > 1:
        scale = model.call.get("controlnet_conditioning_scale", 1.0)
        if not isinstance(scale, list):
            model.call["controlnet_conditioning_scale"] = [scale] * len(model.controlnets)


def _keys(section) -> list[str]:
    """A table's keys: its dataclass fields (not its properties such as search.combos)."""
    return [f.name for f in dataclasses.fields(section)]


def _load_section(target, section: str, values: dict, problem) -> None:
    for key, value in values.items():
        full = f"{section}.{key}"
        if key not in _keys(target):
            problem(full, f"unknown key (allowed: {', '.join(_keys(target))})")
            continue
        if key == "warm_start":
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                setattr(target, key, value)
            else:
                problem(full, 'must be a list such as ["published", "study:NAME"]')
            continue
        if key == "accelerators":
            names = isinstance(value, list) and all(isinstance(v, str) for v in value)
            combos = isinstance(value, list) and value and all(
                isinstance(c, list) and all(isinstance(v, str) for v in c) for c in value)
            if value == "any" or names or combos:
                setattr(target, key, value)
            else:
                problem(full, 'must be a list of accelerator names (one combo), a list of such '
                        'lists (several combos), or "any"')
            continue
        if key == "call":
            _load_call(target, value, problem)
            continue
        if key in ("controlnet", "lora"):
            several = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
            if (isinstance(value, str) and value) or several:
                setattr(target, key, value[0] if several and len(value) == 1 else value)
            else:
                what = "a ControlNet's hub id or folder" if key == "controlnet" else \
                    "a LoRA's hub id, folder or .safetensors file"
                problem(full, f"must be {what}, or a list of them, got {value!r}")
            continue
        if key == "lora_scale":
            values = value if isinstance(value, list) else [value]
            if values and all(_type_ok(v, float) and math.isfinite(v) for v in values):
                setattr(target, key, [float(v) for v in value] if isinstance(value, list) else float(value))
            else:
                problem(full, f"must be a number, or a list of them (one for each LoRA), got {value!r}")
            continue
        expected = _expected_type(type(target), key)
        if expected and not _type_ok(value, expected):
            problem(full, f"must be {_TYPE_NAMES[expected]}, got {value!r}")
            continue
        if expected is float and not math.isfinite(value):
            problem(full, f"must be a finite number, got {value!r}")
            continue
        setattr(target, key, float(value) if expected is float else value)


def _load_call(model, table, problem) -> None:
    """[model.call]: keyword arguments every call takes, as served; not those optsearch sets."""
    if not isinstance(table, dict):
        problem("model.call", "must be a table [model.call] of the pipeline's keyword arguments")
        return
    scalar = (str, int, float, bool)
    for name, value in table.items():
        if name in SET_BY_OPTSEARCH:
            problem(f"model.call.{name}", f"is set by optsearch{SET_BY_OPTSEARCH[name]}")
        elif not (isinstance(value, scalar) or (isinstance(value, list)
                                                 and all(isinstance(v, scalar) for v in value))):
            problem(f"model.call.{name}", f"must be a string, number, true/false or a list of "
                    f"them, got {value!r}")
        else:
            model.call[name] = value


def _load_space(tables: dict, problem) -> dict[str, dict[str, Any]]:
    space: dict[str, dict[str, Any]] = {}
    for accelerator, table in tables.items():
        key = f"space.{accelerator}"
        if accelerator not in ORDER:
            problem(key, f"unknown accelerator (allowed: {', '.join(ORDER)})")
            continue
        if not isinstance(table, dict):
            problem(key, "must be a table")
            continue
        params = params_of(accelerator)
        if accelerator == "distill":  # the LoRA's steps: a key of the spec, not of `apply`
            params = {**params, distill.STEPS.name: distill.STEPS}
        for name, value in table.items():
            if accelerator == "distill" and name == "recipes":
                recipes = _load_recipes(value, params, problem)
                if recipes:
                    space.setdefault(accelerator, {})[name] = recipes
                continue
            if name not in params:
                problem(f"{key}.{name}", f"unknown parameter (allowed: {', '.join(params)})")
                continue
            message = _check_range(params[name], value)
            if message:
                problem(f"{key}.{name}", message)
            else:
                space.setdefault(accelerator, {})[name] = value
    return space


def _load_recipes(recipes, params: dict, problem) -> list[dict]:
    """`[[space.distill.recipes]]`: each a table of distill's keys (one value each) and the
    steps it runs, drawn whole by name (`distill.recipe_name`)."""
    key = "space.distill.recipes"
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, dict) for r in recipes):
        problem(key, "must be tables [[space.distill.recipes]], each a LoRA's recipe (weight_name, "
                "num_inference_steps, scheduler_config, ...)")
        return []
    for number, recipe in enumerate(recipes, 1):
        for name, value in recipe.items():
            where = f"{key}[{number}].{name}"
            if name == "name":
                if not isinstance(value, str) or not value:
                    problem(where, "must be a string")
            elif name not in params:
                problem(where, f"unknown key (allowed: name, {', '.join(params)})")
            elif isinstance(value, list):
                problem(where, "takes one value: a recipe is drawn whole (list recipes to search)")
            elif message := _check_range(params[name], value):
                problem(where, message)
    names = [distill.recipe_name(recipe) for recipe in recipes]
    if "" in names or len(set(names)) < len(names):
        problem(key, f"each recipe needs its own name (got {names}): give each a `name`, "
                "or a weight_name or lora of its own")
    return recipes


def _check_range(param, value) -> str | None:
    """Check a [low, high(, step)] range or a fixed value against the parameter's bounds."""
    if value == "auto":
        return None if param.calibrated else ('"auto" is for thresholds measured before the '
                                              "search (dbcache.residual_diff_threshold, "
                                              "fbcache.threshold)")
    values = value if isinstance(value, list) else [value]
    if param.choices:
        unknown = [item for item in values  # true is no named value, nor 1 a bool's
                   if isinstance(item, bool) != (param.kind is bool) or item not in param.choices]
        if unknown or not values:
            return f"{unknown[0] if unknown else values!r} is not one of {param.allowed()}"
        if len(set(values)) < len(values):
            return f"{values!r} names a choice twice"
        return None
    if param.kind is bool:
        return param.check(values[0]) if len(values) == 1 else "must be true or false"
    if param.kind is str:  # a name, or a list of them to search (distill's LoRA files)
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(name, str) and name for name in names):
            return f"must be a string, or a list of them to search: {param.help}"
        return f"{names!r} names one twice" if len(set(names)) < len(names) else None
    if not 1 <= len(values) <= 3:
        return f"must be [low, high], [low, high, step] or one value ({param.allowed()})"
    for item in values[:2]:
        why = param.check(item)
        if why:
            return f"{item!r} {why} (allowed: {param.allowed()})"
    if len(values) >= 2 and values[0] > values[1]:
        return f"range [{values[0]}, {values[1]}] is inverted (low must be <= high)"
    if len(values) == 3:
        step = values[2]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < math.inf:
            return f"step {step!r} must be a positive number"
        if param.kind is int and not float(step).is_integer():
            return f"step {step!r} must be an integer"
    return None
