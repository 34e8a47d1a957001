"""Spec loading: defaults, shipped specs, and one test per validation case."""

from __future__ import annotations

from pathlib import Path

import pytest

from optsearch.study_spec import SpecError, load_spec, spec_from_dict
from tests.conftest import ROOT

MINIMAL = {"model": {"id": "builtin:tiny"}, "search": {"accelerators": ["deepcache", "tome"]}}


def problems_of(data: dict) -> list[str]:
    with pytest.raises(SpecError) as raised:
        spec_from_dict(data, source="spec.toml")
    return raised.value.problems


def with_(section: str, **values) -> dict:
    data = {key: dict(value) for key, value in MINIMAL.items()}
    data.setdefault(section, {}).update(values)
    return data


def test_minimal_spec_gets_defaults():
    spec = spec_from_dict(MINIMAL)
    assert spec.model.steps == 50 and spec.prompts.num_samples == 32
    assert spec.prompts.batch_size == 4 and spec.quality.clip_model == "ViT-g-14"
    assert spec.search.combos == [("deepcache", "tome")]
    assert spec.param_range("tome", "ratio") == (0.1, 0.7, None)
    assert spec.grid_values("tome", "ratio") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert spec.grid_values("deepcache", "cache_interval") == [2, 3, 4, 5, 6, 7, 8]
    assert spec.param_range("tome", "use_rand") == (True,)


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid(path: Path):
    spec = load_spec(path)
    assert spec.name


def test_any_searches_the_four_combos():
    spec = spec_from_dict({"search": {"accelerators": "any"}})
    assert len(spec.search.combos) == 4 and spec.accelerators_used == ["deepcache", "tome", "tgate"]


CASES = [
    ("unknown top-level key", {**MINIMAL, "modle": {}}, "modle: unknown key"),
    ("unknown section key", with_("model", stesp=3), "model.stesp: unknown key"),
    ("a property is not a key", with_("search", combos=["deepcache"]), "search.combos: unknown key"),
    ("a class attribute is not a key", with_("search", model_kind="video"),
     "search.model_kind: unknown key"),
    ("wrong type", with_("model", steps="many"), "model.steps: must be an integer"),
    ("wrong type bool", with_("search", early_stop="yes"), "search.early_stop: must be true or false"),
    ("empty range", {**MINIMAL, "space": {"tome": {"ratio": []}}}, "space.tome.ratio: must be"),
    ("inverted range", {**MINIMAL, "space": {"deepcache": {"cache_interval": [5, 2]}}},
     "is inverted"),
    ("ratio above 1", {**MINIMAL, "space": {"tome": {"ratio": [0.2, 1.0]}}}, "must be < 1.0"),
    ("ratio negative", {**MINIMAL, "space": {"tome": {"ratio": [-0.1, 0.5]}}}, "must be >= 0.0"),
    ("cache_interval < 1", {**MINIMAL, "space": {"deepcache": {"cache_interval": [0, 3]}}},
     "space.deepcache.cache_interval: 0 must be >= 1"),
    ("gate_step past steps", {"model": {"steps": 10}, "search": {"accelerators": ["tgate"]},
                              "space": {"tgate": {"gate_step": [5, 20]}}}, "past model.steps=10"),
    ("gate_step zero", {"search": {"accelerators": ["tgate"]},
                        "space": {"tgate": {"gate_step": [0, 5]}}}, "must be >= 1"),
    ("tgate without guidance", {"model": {"guidance_scale": 1.0},
                                "search": {"accelerators": ["deepcache", "tgate"]}},
     "tgate needs classifier-free guidance"),
    ("num_samples < 1", with_("prompts", num_samples=0), "prompts.num_samples: 0 must be >= 1"),
    ("batch_size < 1", with_("prompts", batch_size=0), "prompts.batch_size: 0 must be >= 1"),
    ("unknown accelerator", with_("search", accelerators=["deepcache", "turbo"]),
     "unknown accelerator 'turbo'"),
    ("unknown space accelerator", {**MINIMAL, "space": {"turbo": {"x": 1}}},
     "space.turbo: unknown accelerator"),
    ("unknown parameter", {**MINIMAL, "space": {"tome": {"speed": [1, 2]}}},
     "space.tome.speed: unknown parameter"),
    ("unknown scheduler", with_("model", scheduler="Magic"), "unknown scheduler 'Magic'"),
    ("target-speedup without target", with_("objective", mode="target-speedup"),
     "objective.target_speedup: is required"),
    ("unknown mode", with_("objective", mode="fastest"), "unknown mode 'fastest'"),
    ("unknown sampler", with_("search", sampler="cmaes"), "unknown sampler 'cmaes'"),
    ("unknown metric", with_("quality", metric="fid"), "unknown metric 'fid'"),
    ("unknown dtype", with_("model", dtype="int8"), "unknown dtype 'int8'"),
    ("unknown prompt source", with_("prompts", source="laion"), "unknown prompt source 'laion'"),
    ("space for an accelerator not searched", {**MINIMAL, "space": {"tgate": {"gate_step": 5}}},
     "space.tgate: is not searched"),
    ("a range bound not a number", {**MINIMAL, "space": {"tome": {"ratio": [float("nan"), 0.7]}}},
     "space.tome.ratio: nan must be a finite number"),
    ("a range step not a number", {**MINIMAL, "space": {"tome": {"ratio": [0.1, 0.7, float("nan")]}}},
     "space.tome.ratio: step nan must be a positive number"),
    ("an infinite number", with_("model", guidance_scale=float("inf")),
     "model.guidance_scale: must be a finite number, got inf"),
    ("true CFG without a negative prompt", with_("model", true_cfg_scale=4.0),
     "model.true_cfg_scale: 4.0 runs no guidance without a negative prompt"),
    ("a sampler seed numpy refuses", with_("search", seed=2**64),
     "search.seed: 18446744073709551616 must be in"),
    ("a negative sampler seed", with_("search", seed=-1), "search.seed: -1 must be in [0, 2**32 - 1]"),
    ("a prompt seed past 32 bits", with_("prompts", seed=2**32), "prompts.seed: 4294967296 must be in"),
]


@pytest.mark.parametrize("data, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_case(data, expected):
    problems = problems_of(data)
    assert any(expected in line for line in problems), problems
    assert all(line.startswith("spec.toml: ") and "\n" not in line for line in problems)


def test_all_problems_are_reported_at_once():
    data = with_("prompts", num_samples=0, batch_size=0)
    data["search"]["sampler"] = "cmaes"
    assert len(problems_of(data)) == 3


def test_a_wrong_value_is_reported_once_not_again_as_its_default():
    """A key of the wrong type keeps its default; the cross-field checks must not then judge
    that default (quality.limit's 0.3 against a PSNR metric: a value the user never wrote)."""
    assert problems_of(with_("quality", metric="psnr", limit="35")) == [
        "spec.toml: quality.limit: must be a number, got '35'"]
    assert problems_of(with_("model", steps=-3) | {"space": {"deepcache": {"cache_interval": [2, 6]}},
                                                   "search": {"accelerators": ["deepcache"]}}) == [
        "spec.toml: model.steps: must be >= 1"]


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nid = 1")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(broken)


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my-study.toml"
    path.write_text('[model]\nid = "builtin:tiny"\n')
    assert load_spec(path).name == "my-study"


def test_a_space_smaller_than_n_trials_is_noted_with_its_size():
    """sd15-deepcache searches 7 intervals x 4 branches for 60 trials: the search will end at
    28. Choices and the grid count their values; a continuous or "auto" range has no size."""
    from optsearch.study_spec import notes

    shipped = load_spec(ROOT / "studies" / "sd15-deepcache.toml")
    assert shipped.space_size() == 28
    assert "the space holds at most 28 distinct settings, fewer than search.n_trials = 60: the " \
        "search ends when every one is tried (a repeat copies its result for free)" in notes(shipped)
    two_combos = spec_from_dict({**MINIMAL, "search": {"accelerators": [["deepcache"], ["steps"]]},
                                 "model": {"id": "builtin:tiny", "steps": 8},
                                 "space": {"steps": {"num_inference_steps": [2, 7]}}})
    assert two_combos.space_size() == 28 + 6
    assert spec_from_dict(MINIMAL).space_size() is None  # ToMe's ratio is continuous ...
    grid = {**MINIMAL, "search": {"accelerators": ["deepcache", "tome"], "sampler": "grid"}}
    assert spec_from_dict(grid).space_size() == 28 * 7 * 2  # ... but not on the grid
    masks = spec_from_dict({"model": {"id": "builtin:tiny-flux", "steps": 12},
                            "search": {"accelerators": ["dbcache"], "n_trials": 4},
                            "space": {"dbcache": {
                                "residual_diff_threshold": [0.1], "Fn_compute_blocks": [1, 2],
                                "Bn_compute_blocks": [0], "max_warmup_steps": [1],
                                "warmup_interval": [1], "max_cached_steps": [-1],
                                "max_continuous_cached_steps": [-1], "taylorseer_order": [0],
                                "steps_computation_mask": ["none", "fast", "ultra"],
                                "steps_computation_policy": ["dynamic", "static"]}}})
    assert masks.space_size() == 2 * 3 * 2 and not [n for n in notes(masks) if "space" in n]
    assert spec_from_dict({"model": {"id": "builtin:tiny-flux"},  # an "auto" threshold
                           "search": {"accelerators": ["dbcache"]}}).space_size() is None


def test_a_grid_over_several_combos_tries_each_combos_own_grid_once_then_stops():
    """The original script grid-searched four combos. Optuna's GridSampler holds one grid; over
    several combos (a conditional space) the grid is brute force: every combo's every point,
    each once, then the study stops by itself."""
    import json

    import optuna

    from optsearch.optimize.samplers import make_sampler
    from optsearch.optimize.space import suggest_setting

    spec = spec_from_dict({"model": {"id": "builtin:tiny", "steps": 8},
                           "search": {"accelerators": [["deepcache"], ["tome"]], "sampler": "grid",
                                      "n_trials": 50},
                           "space": {"deepcache": {"cache_interval": [2, 3], "cache_branch_id": 0},
                                     "tome": {"ratio": [0.3, 0.4, 0.1], "max_downsample": 1}}})
    study = optuna.create_study(sampler=make_sampler(spec))
    drawn = []
    study.optimize(lambda trial: drawn.append(suggest_setting(trial, spec)) or 1.0, n_trials=50)
    assert len(drawn) == 4 == spec.space_size()  # stopped once the grid is through
    expected = ({"deepcache": {"cache_interval": 2, "cache_branch_id": 0}},
                {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
                {"tome": {"ratio": 0.3, "max_downsample": 1, "use_rand": True}},
                {"tome": {"ratio": 0.4, "max_downsample": 1, "use_rand": True}})
    assert sorted(json.dumps(setting, sort_keys=True) for setting in drawn) \
        == sorted(json.dumps(setting, sort_keys=True) for setting in expected)
    # "any" on the grid: the four combos of the original workflow, each its own grid
    any_grid = spec_from_dict({"search": {"accelerators": "any", "sampler": "grid"}})
    assert len(any_grid.search.combos) == 4 and any_grid.space_size() > 4


def test_notes_say_what_a_valid_spec_will_do_unexpectedly():
    """A random-weight CLIP, and passes of too few batches for a speedup interval to tell
    anything (2 batches: one slow batch leaves every trial "not measured enough to tell")."""
    from optsearch.study_spec import notes

    def spec(**prompts):
        return spec_from_dict({"name": "n", "model": {"id": "builtin:tiny"},
                               "prompts": {"source": "builtin", **prompts},
                               "quality": {"clip_model": "builtin:tiny", "clip_pretrained": "none",
                                           "metric": "psnr", "limit": 30.0},
                               "search": {"accelerators": ["deepcache"], "n_trials": 28}})

    thin, = [line for line in notes(spec(num_samples=8, batch_size=4)) if "batches" in line]
    assert thin.startswith("prompts.num_samples = 8 in batches of 4 is 2 batches a pass")
    assert "not measured enough to tell" in thin
    enough = notes(spec(num_samples=8, batch_size=2))
    assert enough == ["n scores with a random-weight CLIP (clip_pretrained = \"none\"): CLIP scores "
                      "mean nothing here, so it constrains psnr (fidelity to the baseline) instead"]


def test_tgate_default_range_fits_any_step_count():
    """T-GATE's 5-20 of 50 steps, as a share of model.steps: a 16-step spec that names no range
    searches 2-6 (it was refused: "[5, 20] goes past model.steps=16", a range the user never
    wrote); 50 steps keep the paper's 5-20."""
    for steps, expected in ((16, (2, 6, None)), (50, (5, 20, None))):
        spec = spec_from_dict({"model": {"id": "builtin:tiny", "steps": steps},
                               "search": {"accelerators": ["tgate"]}})
        assert spec.param_range("tgate", "gate_step") == expected
