"""`optsearch evaluate`: one setting (the spec's combo at its defaults, `--set` overrides)
measured against the spec's baseline, with no study: the quick answer to "what does this do here?"."""

from __future__ import annotations

import json
import math
from pathlib import Path

from optsearch.accelerators import ORDER, combo_problem, normalize_setting, pipeline_problem
from optsearch.errors import UsageError
from optsearch.formatting import comparison_table, compile_text, format_setting
from optsearch.measure.model_ids import check_folders
from optsearch.study_spec import SpecError, check_setting, load_spec


def _parse_value(key: str, text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            value = convert(text)
        except ValueError:
            continue
        if not math.isfinite(value):
            raise UsageError(f"--set {key}={text}: {text!r} is not a finite number")
        return value
    return text  # a name (cache-dit's masks), or a mistake the setting's check names


def parse_sets(items: list[str]) -> dict:
    """['tome.ratio=0.5', ...] -> {'tome.ratio': 0.5, ...}."""
    setting = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise UsageError(f"--set {item!r} must look like ACCELERATOR.PARAM=VALUE")
        setting[key.strip()] = _parse_value(key.strip(), value.strip())
    return setting


def cmd_evaluate(args) -> int:
    spec = load_spec(args.spec)
    try:
        sets = parse_sets(args.set)
        named = sets.pop("distill.recipe", None)  # a recipe is drawn by name, not a parameter
        recipe, given = _recipe(spec, named), normalize_setting(sets)
        wanted = set(given) | ({"distill"} if named is not None else set())
        combo = next((c for c in spec.search.combos if wanted <= set(c)), None)
        if combo is None:  # say why about the families given, not a combo they were mixed into
            problem = combo_problem(list(given), spec.search.model_kind) or check_setting(given, spec)[0]
            raise SpecError([f"--set: {problem}"])
        setting = default_setting(combo, spec.model.steps)
        if "distill" in setting:  # the spec's LoRA (no library default names one), at the
            setting["distill"].update(spec.distill_settings([recipe])[0]["distill"])  # most steps
            drawn = spec.param_range("steps", "num_inference_steps", combo=combo, recipe=recipe)
            setting["steps"] = {"num_inference_steps": int(max(drawn[:2]))}
        for accelerator, values in given.items():
            setting.setdefault(accelerator, {}).update(values)
        setting = normalize_setting(setting)
    except ValueError as error:
        raise UsageError(str(error)) from None
    problems = check_setting(setting, spec)
    if problems:
        raise SpecError([f"{args.spec}: {p}" for p in problems])
    images_folder = output_folder(args.save_images, "--save-images") if args.save_images else None
    check_folders(spec.model)
    # torch and diffusers load once the arguments are known good: a typo answers in a second
    from optsearch.measure.evaluate import evaluator_from_spec
    from optsearch.optimize import pass_noise

    evaluator = evaluator_from_spec(spec, device=args.device, progress=not args.quiet)
    if problem := pipeline_problem(list(setting), evaluator.pipe, setting):  # before the baseline
        raise UsageError(f"--set: {problem}")
    baseline = evaluator.baseline()
    keep = len(evaluator.prompts) if args.save_images else 0
    comparison = evaluator.compare(setting, baseline, keep_images=keep,
                                   pass_noise=pass_noise.assumed(spec.search.pass_noise))
    if images_folder is not None:
        save_images(images_folder, baseline.images, comparison.images)
    if args.json:  # with what the timings are comparable to: device, dtype, versions, offload
        from optsearch.measure.fingerprint import fingerprint

        digest, facts = fingerprint(evaluator.pipe, evaluator.config.batch_size)
        print(json.dumps({**comparison.to_dict(), "fingerprint": digest, "measured_with": facts},
                         indent=2))
    else:
        print(f"{spec.name}: {len(evaluator.prompts)} prompts, batch size "
              f"{evaluator.config.batch_size}, {format_setting(comparison.setting)}")
        summary = comparison.summary()
        print(comparison_table(summary))
        if compiled := compile_text(summary):  # None when eager
            print(compiled)
    return 0


def _recipe(spec, name: str | None) -> dict:
    """The distill recipe `--set distill.recipe=NAME` names (without it, the spec's first)."""
    recipes = spec.named_recipes()
    if name is None:
        return next(iter(recipes.values()))
    if str(name) not in recipes:
        raise UsageError(f"--set distill.recipe={name}: the spec has no such recipe (its recipes: "
                         f"{', '.join(n for n in recipes if n) or 'none'})")
    return recipes[str(name)]


def default_setting(combo, model_steps: int | None = None) -> dict[str, dict]:
    """Each accelerator of `combo` at its library's default parameters; `steps` (which has no
    library default) at half of `model_steps`."""
    setting = {name: {} for name in ORDER if name in combo}
    if "steps" in setting and model_steps:
        setting["steps"] = {"num_inference_steps": max(1, model_steps // 2)}
    return normalize_setting(setting)


def output_folder(path: str, option: str) -> Path:
    """The folder `option` names, made now (with its parents): one that cannot be is bad input,
    said before anything is measured or drawn."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot make that folder ({error.strerror})") from None
    return folder


def save_images(folder: Path, baseline, setting: list) -> None:
    """Write baseline_NNN.png and setting_NNN.png per prompt index (uint8 arrays)."""
    from PIL import Image

    for index, image in enumerate(baseline):
        Image.fromarray(image).save(folder / f"baseline_{index:03d}.png")
    for index, image in enumerate(setting):
        Image.fromarray(image).save(folder / f"setting_{index:03d}.png")
