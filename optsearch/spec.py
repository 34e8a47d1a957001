"""The study spec: one TOML file that describes one search.

`load_spec(path)` reads and validates a spec and returns a `StudySpec`. Every problem found is
reported as one line naming the file, the key, what is wrong and what is allowed; all problems are
collected before raising `SpecError`, so a user fixes a spec in one pass.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optsearch.accelerators import ANY_COMBOS, KINDS, ORDER, combo_name, combo_problem, params_of
from optsearch.errors import SpecError

DTYPES = ("auto", "float16", "bfloat16", "float32")
METRICS = ("clip_loss", "psnr", "ssim")
RULES = ("mean", "bound")
MODES = ("max-speedup", "target-speedup", "pareto")
SAMPLERS = ("tpe", "gp", "random", "grid")
PROMPT_SOURCES = ("coco2017", "parti", "builtin")
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
KNOWN_SCHEDULERS = (
    "DDIM", "PNDM", "DDPM", "LMSDiscrete", "EulerDiscrete", "EulerAncestralDiscrete",
    "DPMSolverMultistep", "DPMSolverSinglestep", "DEISMultistep", "UniPCMultistep", "HeunDiscrete",
    "KDPM2Discrete", "KDPM2AncestralDiscrete", "LCM", "TCD",
)




@dataclass
class ModelSpec:
    id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    dtype: str = "auto"  # float16 for UNets, bfloat16 for diffusion transformers, float32 on CPU
    kind: str = "auto"  # "unet" or "transformer": which families apply; auto tells from the id
    device: str = "auto"
    scheduler: str | None = None  # None keeps the model's own scheduler
    steps: int = 50
    height: int | None = None  # None: the model's native size
    width: int | None = None
    guidance_scale: float = 7.5


@dataclass
class PromptSpec:
    source: str = "coco2017"
    num_samples: int = 32
    batch_size: int = 4
    seed: int = 42
    shuffle: bool = False
    column: str | None = None  # the text column of a file or dataset, when not guessed


@dataclass
class QualitySpec:
    clip_model: str = "ViT-g-14"
    clip_pretrained: str = "laion2b_s34b_b88k"
    metric: str = "clip_loss"
    limit: float = 0.3
    confidence: float = 0.95
    rule: str = "mean"  # feasible when the mean meets the limit, or ("bound") its unsafe-side bound


@dataclass
class ObjectiveSpec:
    mode: str = "max-speedup"
    target_speedup: float | None = None


@dataclass
class SearchSpec:
    accelerators: list[str] | str = field(default_factory=lambda: ["deepcache"])
    sampler: str = "tpe"
    n_trials: int = 60
    early_stop: bool = True
    min_batches: int = 1  # batches evaluated before early stop may decide (speedup looks: >= 2)
    seed: int | None = None  # sampler seed
    n_startup_trials: int = 20  # tuned on the recorded landscape (benchmarks/RESULTS.md)
    retime_baseline_every: int = 0  # re-time the worker's baseline every N trials; 0: once per worker
    warm_start: list[str] = field(default_factory=lambda: ["published"])  # enqueued first

    model_kind = "unet"  # set from [model] when the spec is loaded (not a spec key)

    @property
    def combos(self) -> list[tuple[str, ...]]:
        """The combos searched: the one given, several (a list of lists), or for 'any' those of
        the model's kind (accelerators.ANY_COMBOS)."""
        if self.accelerators == "any":
            return list(ANY_COMBOS[self.model_kind])
        if self.accelerators and all(isinstance(c, list) for c in self.accelerators):
            return [tuple(name for name in ORDER if name in combo) for combo in self.accelerators]
        return [tuple(name for name in ORDER if name in self.accelerators)]


@dataclass
class ArtifactSpec:
    path: str = "artifacts"  # a local folder, or s3://bucket/prefix
    grid_prompts: int = 4  # prompts shown in each trial's image grid; 0 disables grids


@dataclass
class ConfirmSpec:
    """Prompts for `study confirm`: by default the next num_samples prompts of the search's source."""

    source: str | None = None
    num_samples: int | None = None
    seed: int | None = None


@dataclass
class StudySpec:
    name: str = "optsearch"
    model: ModelSpec = field(default_factory=ModelSpec)
    prompts: PromptSpec = field(default_factory=PromptSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    artifacts: ArtifactSpec = field(default_factory=ArtifactSpec)
    confirm: ConfirmSpec = field(default_factory=ConfirmSpec)
    # accelerator -> param -> [low, high] or [low, high, step] or a fixed value
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def accelerators_used(self) -> list[str]:
        return [name for name in ORDER if any(name in combo for combo in self.search.combos)]

    def param_range(self, accelerator: str, param: str) -> tuple:
        """(low, high, step or None) for a searched parameter, or (value,) for a fixed one."""
        value = self.space.get(accelerator, {}).get(param)
        if value is None:
            value = params_of(accelerator)[param].default_range(self.model.steps)
        if not isinstance(value, (list, tuple)):
            return (value,)
        if len(value) == 1:
            return tuple(value)
        return (value[0], value[1], value[2] if len(value) == 3 else None)

    def searched_params(self, accelerator: str) -> list[str]:
        """The parameters of `accelerator` that this spec searches (ranges, not fixed values)."""
        return [p for p in params_of(accelerator) if len(self.param_range(accelerator, p)) > 1]

    def grid_values(self, accelerator: str, param: str) -> list:
        """Every value the exhaustive grid tries for a parameter (step: given, else its default)."""
        bounds = self.param_range(accelerator, param)
        if len(bounds) == 1:
            return list(bounds)
        low, high, step = bounds
        step = step or params_of(accelerator)[param].grid_step
        count = int(round((high - low) / step + 1e-9)) + 1
        values = [low + i * step for i in range(count)]
        if params_of(accelerator)[param].kind is int:
            return [int(v) for v in values]
        return [round(v, 10) for v in values]


SECTIONS = {
    "model": ModelSpec,
    "prompts": PromptSpec,
    "quality": QualitySpec,
    "objective": ObjectiveSpec,
    "search": SearchSpec,
    "artifacts": ArtifactSpec,
    "confirm": ConfirmSpec,
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _expected_type(section: type, key: str) -> type | None:
    """The Python type a key holds (from its default), for type checking TOML values."""
    default = getattr(section(), key)
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float, str)):
        return float if isinstance(default, float) else type(default)
    hints = {"scheduler": str, "height": int, "width": int, "target_speedup": float,
             "seed": int, "column": str, "source": str, "num_samples": int}
    return hints.get(key)


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
    missing = [f"{path}: {key}: file {value} does not exist (relative paths are read from the "
               "spec's folder)" for key, value in _prompt_files(spec) if not Path(value).is_file()]
    if missing:
        raise SpecError(missing)
    return spec


def _is_prompt_file(source: str) -> bool:
    return source not in PROMPT_SOURCES and source.lower().endswith(PROMPT_FILE_SUFFIXES)


def _prompt_files(spec: StudySpec) -> list[tuple[str, str]]:
    files = [("prompts.source", spec.prompts.source), ("confirm.source", spec.confirm.source)]
    return [(key, value) for key, value in files if value and _is_prompt_file(value)]


def _resolve_paths(data: dict, folder: Path) -> None:
    """Make the relative paths a spec names (prompt files, the artifacts folder, a local model
    folder) absolute from the spec's own folder, so every worker reads the same files."""
    def resolve(section: str, key: str, applies) -> None:
        table = data.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if isinstance(value, str) and applies(value) and not Path(value).expanduser().is_absolute():
            table[key] = str((folder / Path(value).expanduser()).resolve())

    resolve("prompts", "source", _is_prompt_file)
    resolve("confirm", "source", _is_prompt_file)
    resolve("artifacts", "path", lambda value: "://" not in value)
    resolve("model", "id", lambda value: value.startswith(("./", "../")))


def spec_from_dict(data: dict, source: str = "<spec>",
                   overrides: dict[str, Any] | None = None) -> StudySpec:
    """Build and validate a spec from a dict (a parsed TOML file, or one stored in a study)."""
    problems: list[str] = []
    spec = StudySpec(name=Path(source).stem if source != "<spec>" else "optsearch")

    def problem(key: str, message: str) -> None:
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
        if section not in SECTIONS or not hasattr(getattr(spec, section), key):
            problem(dotted, "unknown key")
        else:
            _load_section(getattr(spec, section), section, {key: value}, problem)
    spec.search.model_kind = _model_kind(spec.model)
    _validate(spec, problem)  # wrongly typed keys kept their defaults, so this is safe
    if problems:
        raise SpecError(problems)
    return spec


def _model_kind(model: ModelSpec) -> str:
    """The model's kind: as the spec says, else told from its id (unknown: a UNet)."""
    if model.kind in KINDS:
        return model.kind
    from optsearch.measure.models import model_kind

    return model_kind(model.id) or "unet"


def _load_section(target, section: str, values: dict, problem) -> None:
    for key, value in values.items():
        full = f"{section}.{key}"
        if not hasattr(target, key):
            allowed = ", ".join(vars(type(target)()).keys())
            problem(full, f"unknown key (allowed: {allowed})")
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
        expected = _expected_type(type(target), key)
        if expected and not _type_ok(value, expected):
            problem(full, f"must be {_TYPE_NAMES[expected]}, got {value!r}")
            continue
        setattr(target, key, float(value) if expected is float else value)


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
        for name, value in table.items():
            if name not in params:
                problem(f"{key}.{name}", f"unknown parameter (allowed: {', '.join(params)})")
                continue
            message = _check_range(params[name], value)
            if message:
                problem(f"{key}.{name}", message)
            else:
                space.setdefault(accelerator, {})[name] = value
    return space


def _check_range(param, value) -> str | None:
    """Check a [low, high(, step)] range or a fixed value against the parameter's bounds."""
    values = value if isinstance(value, list) else [value]
    if param.kind is bool:
        return param.check(values[0]) if len(values) == 1 else "must be true or false"
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
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            return f"step {step!r} must be a positive number"
        if param.kind is int and not float(step).is_integer():
            return f"step {step!r} must be an integer"
    return None


def _validate(spec: StudySpec, problem) -> None:
    """Cross-field checks, after every key has the right type."""
    model, prompts, quality = spec.model, spec.prompts, spec.quality
    objective, search = spec.objective, spec.search
    if model.kind not in ("auto", *KINDS):
        problem("model.kind", f"unknown kind {model.kind!r} (allowed: auto, {', '.join(KINDS)})")
    if model.dtype not in DTYPES:
        problem("model.dtype", f"unknown dtype {model.dtype!r} (allowed: {', '.join(DTYPES)})")
    if check_device(model.device):
        problem("model.device", check_device(model.device))
    if model.scheduler is not None:
        name = model.scheduler.removesuffix("Scheduler")
        if name not in KNOWN_SCHEDULERS:
            problem("model.scheduler",
                    f"unknown scheduler {model.scheduler!r} (allowed: {', '.join(KNOWN_SCHEDULERS)})")
    if model.steps < 1:
        problem("model.steps", "must be >= 1")
    for key in ("height", "width"):
        size = getattr(model, key)
        if size is not None and (size < 8 or size % 8):
            problem(f"model.{key}", f"{size} must be a multiple of 8, at least 8")
    if not model.guidance_scale >= 0:
        problem("model.guidance_scale", "must be >= 0")
    if not model.id:
        problem("model.id", "must name a model: hub id, local folder or builtin:tiny")
    if prompts.num_samples < 1:
        problem("prompts.num_samples", f"{prompts.num_samples} must be >= 1")
    if prompts.batch_size < 1:
        problem("prompts.batch_size", f"{prompts.batch_size} must be >= 1")
    _check_source("prompts.source", prompts.source, problem)
    if quality.metric not in METRICS:
        problem("quality.metric", f"unknown metric {quality.metric!r} (allowed: {', '.join(METRICS)})")
    elif quality.metric == "ssim" and not -1 <= quality.limit <= 1:
        problem("quality.limit", f"{quality.limit} is not an SSIM (allowed: -1..1)")
    if not math.isfinite(quality.limit):
        problem("quality.limit", "must be a finite number")
    if not 0.5 <= quality.confidence < 1:
        problem("quality.confidence", "must be in [0.5, 1)")
    if quality.rule not in RULES:
        problem("quality.rule", f"unknown rule {quality.rule!r} (allowed: {', '.join(RULES)})")
    if objective.mode not in MODES:
        problem("objective.mode", f"unknown mode {objective.mode!r} (allowed: {', '.join(MODES)})")
    elif objective.mode == "target-speedup":
        if objective.target_speedup is None:
            problem("objective.target_speedup", "is required when mode is target-speedup")
        elif objective.target_speedup <= 0:
            problem("objective.target_speedup", "must be > 0")
    if search.sampler not in SAMPLERS:
        problem("search.sampler", f"unknown sampler {search.sampler!r} (allowed: {', '.join(SAMPLERS)})")
    if search.sampler == "grid" and search.accelerators == "any":
        problem("search.sampler", 'grid needs one combo: name the accelerators instead of "any"')
    if search.n_trials < 1:
        problem("search.n_trials", "must be >= 1")
    if search.min_batches < 1:
        problem("search.min_batches", "must be >= 1")
    if search.n_startup_trials < 0:
        problem("search.n_startup_trials", "must be >= 0")
    if search.retime_baseline_every < 0:
        problem("search.retime_baseline_every", "must be >= 0 (0: time the baseline once per worker)")
    for source in search.warm_start:
        if source != "published" and not (source.startswith("study:") and source[6:].strip()):
            problem("search.warm_start", f"unknown warm start {source!r} (allowed: \"published\", "
                    "\"study:NAME\")")
    confirm = spec.confirm
    if confirm.num_samples is not None and confirm.num_samples < 1:
        problem("confirm.num_samples", f"{confirm.num_samples} must be >= 1")
    if confirm.source is not None:
        _check_source("confirm.source", confirm.source, problem)
    if search.accelerators != "any":
        named = [n for c in search.accelerators for n in ([c] if isinstance(c, str) else c)]
        unknown = [name for name in named if name not in ORDER]
        if unknown:
            problem("search.accelerators", f"unknown accelerator {unknown[0]!r} "
                    f"(allowed: {', '.join(ORDER)}, or \"any\")")
            return
        if not search.accelerators or not all(search.combos):
            problem("search.accelerators", 'must name at least one accelerator, or "any"')
            return
    kind = search.model_kind
    for combo in search.combos:
        why = combo_problem(combo, kind)
        if why:
            problem("search.accelerators", why)
            return
    used = spec.accelerators_used
    for accelerator in spec.space:
        if accelerator not in used:
            problem(f"space.{accelerator}",
                    f"is not searched (search.accelerators is "
                    f"{', '.join(combo_name(c) for c in search.combos) or 'empty'})")
    if "tgate" in used and model.guidance_scale <= 1:
        problem("search.accelerators", "tgate needs classifier-free guidance: "
                f"model.guidance_scale is {model.guidance_scale}, must be > 1")
    for accelerator in used:
        for name, declared in params_of(accelerator).items():
            counted = declared.counts_steps or declared.scales_with_steps
            given = name in spec.space.get(accelerator, {}) or accelerator == "tgate"
            bounds = spec.param_range(accelerator, name)
            if counted and given and any(value > model.steps for value in bounds[:2]):
                problem(f"space.{accelerator}.{name}", f"{list(bounds[:2])} goes past "
                        f"model.steps={model.steps} (allowed: 1..steps)")
    if spec.artifacts.grid_prompts < 0:
        problem("artifacts.grid_prompts", "must be >= 0")


def _check_source(key: str, source: str, problem) -> None:
    if source not in PROMPT_SOURCES and not source.lower().endswith(PROMPT_FILE_SUFFIXES):
        problem(key, f"unknown prompt source {source!r} (allowed: "
                f"{', '.join(PROMPT_SOURCES)}, or a {'/'.join(PROMPT_FILE_SUFFIXES)} file)")


def check_device(device: str) -> str | None:
    """Why `device` is not a device name optsearch takes (spec and --device alike), or None."""
    prefix, _, index = device.partition(":")
    if device in ("auto", "cpu", "cuda") or (prefix == "cuda" and index.isdigit()):
        return None
    return f"unknown device {device!r} (allowed: auto, cpu, cuda, cuda:N)"


def check_setting(setting: dict[str, dict], spec: StudySpec) -> list[str]:
    """Problems with running `setting` on the spec's model: its combo must be one the spec
    searches, T-GATE needs guidance, and step-counted parameters must fit in the setting's steps
    (its `steps.num_inference_steps`, else model.steps)."""
    from optsearch.accelerators import step_problems

    foreign = combo_problem(list(setting), spec.search.model_kind)
    if foreign:
        return [foreign]
    combos = [combo_name(c) for c in spec.search.combos]
    if combo_name(setting) not in combos:
        return [f"the setting is {combo_name(setting)}, which this spec does not search "
                f"(search.accelerators gives: {', '.join(combos)})"]
    problems = step_problems(setting, spec.model.steps)
    if "tgate" in setting and spec.model.guidance_scale <= 1:
        problems.append("tgate needs classifier-free guidance: model.guidance_scale is "
                        f"{spec.model.guidance_scale}, must be > 1")
    return problems
