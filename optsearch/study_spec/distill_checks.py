"""The step-distilled LoRA's spec checks and notes (`[space.distill]`, its recipes): apart
from checks.py, which calls them, because the family's keys (lists, recipes, steps of its own,
files on disk) take more reading than any other family's."""

from __future__ import annotations

import os

from optsearch.accelerators import distill
from optsearch.study_spec.schema import StudySpec, listed


def distill_notes(spec: StudySpec) -> list[str]:
    """What a distill study does that its user may not expect (`notes`' lines)."""
    lines = []
    if "distill" in spec.accelerators_used and False in spec.searched_values("distill")["fuse"]:
        lines.append("distill's LoRA is measured as an adapter (its low-rank work at every step); "
                     "set space.distill.fuse = true if you serve it fused")
    for family in dict.fromkeys(family for family, _ in spec.auto_params()):
        conditions = spec.calibration_conditions(family)
        loras = sum(condition.lora is not None for condition in conditions)
        if len(conditions) > 1:
            plain = "the plain model and " if conditions[0].lora is None else ""
            lines.append(f"{family}'s \"auto\" range is calibrated on {plain}each of {loras} "
                         f"step-distilled LoRA{'s' if loras > 1 else ''}: each trial samples the "
                         "range of the model it runs")
    if own := _distill_steps_note(spec):
        lines.append(own)
    return lines


def _distill_steps_note(spec: StudySpec) -> str | None:
    """'distill runs at its own steps: 4-step at 4, 8-step at 8; steps alone (the fewer-steps
    line) at 16-40': where a spec gives the LoRA its own steps or recipes, what each draws."""
    combo = next((combo for combo in spec.search.combos if "distill" in combo), None)
    if combo is None or (spec.distilled_steps(combo) is None and spec.recipes() == [{}]):
        return None

    def span(bounds: tuple) -> str:
        return f"{bounds[0]}-{bounds[1]}" if len(bounds) > 1 else f"{bounds[0]}"

    drawn = [f"{distill.recipe_name(recipe) or 'the LoRA'} at "
             f"{span(spec.param_range('steps', 'num_inference_steps', combo=combo, recipe=recipe))}"
             for recipe in spec.recipes()]
    plain = span(spec.param_range("steps", "num_inference_steps"))
    alone = f"; steps alone (the fewer-steps line) at {plain}" if ("steps",) in spec.search.combos else ""
    return f"distill runs at its own steps: {', '.join(drawn)}{alone}"


def check_distill(spec: StudySpec, problem) -> None:
    """The step-distilled LoRA's keys: a LoRA given, each local path there, each recipe
    readable, and fused where the denoiser is compiled."""
    given = spec.space.get("distill", {})
    recipes = given.get("recipes") or []
    tables = [("space.distill", given)] + [(f"space.distill.recipes[{number}]", recipe)
                                           for number, recipe in enumerate(recipes, 1)]
    if not given.get("lora") and not (recipes and all(recipe.get("lora") for recipe in recipes)):
        problem("space.distill.lora", "is required with distill: the step-distilled LoRA's hub id, "
                "folder or .safetensors file (Lightning, Hyper-SD, Turbo)")
    for where, table in tables:
        for key in ("lora", "lora_2"):
            for lora in listed(table.get(key)):
                path = os.path.expanduser(lora)
                if os.path.isabs(path) and not os.path.exists(path):  # a path: not a hub id
                    problem(f"{where}.{key}", f"{lora!r}: no such file or folder")
        for recipe in listed(table.get("scheduler_config")):
            try:
                distill.scheduler_overrides(recipe)
            except ValueError as error:
                problem(f"{where}.scheduler_config",
                        str(error).removeprefix("distill.scheduler_config "))
        steps = spec.param_range("steps", "num_inference_steps", combo=("distill", "steps"),
                                 recipe=table if table is not given else None)
        if "num_inference_steps" in table and any(count > spec.model.steps for count in steps[:2]):
            problem(f"{where}.num_inference_steps", f"{list(steps[:2])} goes past "
                    f"model.steps={spec.model.steps} (allowed: 1..steps)")
    if spec.model.compile != "none" and spec.searched_values("distill")["fuse"] != [True]:
        problem("model.compile", "distill kept as an adapter wraps the denoiser's layers for each "
                "trial, which recompiles it: set space.distill.fuse = true (fused, the layers stay "
                "as compiled) or compile = \"none\"")
