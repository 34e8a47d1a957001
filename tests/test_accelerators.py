"""Each accelerator and each combo really changes the output, repeats exactly, and restores exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import optsearch
from optsearch.accelerators import COMBOS, AppliedSetting, combo_name, normalize_setting
from optsearch.errors import UsageError
from tests.conftest import generate_images

PROMPTS = ["a red bus on a street", "two dogs in a field", "a bowl of fruit"]
SETTINGS = {
    "deepcache": {"cache_interval": 3, "cache_branch_id": 0},
    "tome": {"ratio": 0.5, "max_downsample": 1},
    "tgate": {"gate_step": 4},
}
SINGLE = [("deepcache",), ("tome",), ("tgate",)]


def setting_for(combo):
    return {name: SETTINGS[name] for name in combo}


@pytest.fixture(scope="module")
def baseline(tiny_pipe):
    return generate_images(tiny_pipe, PROMPTS)


@pytest.mark.parametrize("combo", SINGLE + list(COMBOS), ids=combo_name)
def test_setting_changes_output_repeats_and_restores(tiny_pipe, baseline, combo):
    applied = AppliedSetting(tiny_pipe, setting_for(combo))
    first = generate_images(applied, PROMPTS, reseed=applied.reseed)
    second = generate_images(applied, PROMPTS, reseed=applied.reseed)
    applied.restore()
    after = generate_images(tiny_pipe, PROMPTS)

    assert np.abs(first - baseline).max() > 1e-3, "the accelerator silently did nothing"
    assert np.array_equal(first, second), "two runs of the same setting differ"
    assert np.array_equal(after, baseline), "restore did not give the baseline back"


def test_ten_mixed_cycles_leave_baseline_bit_exact(tiny_pipe, baseline):
    combos = SINGLE + list(COMBOS)
    for cycle in range(10):
        combo = combos[cycle % len(combos)]
        setting = setting_for(combo)
        if "deepcache" in setting:
            setting["deepcache"] = {"cache_interval": 2 + cycle % 3, "cache_branch_id": cycle % 2}
        with AppliedSetting(tiny_pipe, setting) as applied:
            generate_images(applied, PROMPTS[:2], reseed=applied.reseed)
    assert np.array_equal(generate_images(tiny_pipe, PROMPTS), baseline)


def test_tgate_restore_removes_every_patch(tiny_pipe):
    with AppliedSetting(tiny_pipe, setting_for(("deepcache", "tgate"))) as applied:
        generate_images(applied, PROMPTS[:1])
        patched = [m for m in tiny_pipe.unet.modules() if "forward" in m.__dict__]
        assert patched, "T-GATE/DeepCache should have patched module forwards while applied"
    leftovers = [type(m).__name__ for m in tiny_pipe.unet.modules()
                 if "forward" in m.__dict__ or "cache" in m.__dict__]
    assert leftovers == []
    assert "forward" not in tiny_pipe.unet.__dict__, "DeepCache must be disabled after T-GATE"
    assert not hasattr(tiny_pipe, "tgate") and not hasattr(tiny_pipe, "deepcache")


def test_tome_random_merging_is_reseeded(tiny_pipe):
    with AppliedSetting(tiny_pipe, {"tome": {"ratio": 0.5, "use_rand": True}}) as applied:
        first = generate_images(applied, PROMPTS[:2], reseed=applied.reseed)
        torch.manual_seed(1234)  # global RNG state must not matter
        second = generate_images(applied, PROMPTS[:2], reseed=applied.reseed)
    assert np.array_equal(first, second)


def test_failed_apply_leaves_pipeline_untouched(tiny_pipe, baseline):
    with pytest.raises(ValueError, match="cache_branch_id"):
        AppliedSetting(tiny_pipe, {"deepcache": {"cache_interval": 3, "cache_branch_id": 9}})
    assert np.array_equal(generate_images(tiny_pipe, PROMPTS), baseline)


def test_a_pipeline_that_comes_accelerated_is_refused_not_stacked(tiny_pipe, baseline):
    """A pipeline with ToMe (or DeepCache, a setting a notebook never restored) already on: `apply`
    refuses to stack a setting on it, and a search refuses it as its baseline (one line, before
    anything is measured); once removed, the pipeline is the plain one again."""
    import tomesd

    from optsearch.errors import ModelLoadError
    from optsearch.measure.served import check_families
    from optsearch.study_spec import spec_from_dict

    tomesd.apply_patch(tiny_pipe, ratio=0.5)
    try:
        with pytest.raises(ValueError, match=r"already has ToMe \(tomesd.apply_patch\)"):
            optsearch.apply(tiny_pipe, setting_for(("deepcache",)))
        with pytest.raises(ModelLoadError, match="comes with ToMe .* the baseline must be the plain"):
            check_families(tiny_pipe, spec_from_dict({"model": {"id": "builtin:tiny"}}))
    finally:
        tomesd.remove_patch(tiny_pipe)
    with optsearch.apply(tiny_pipe, setting_for(("tome",))):
        pass  # our own ToMe, restored: leaves nothing that reads as "already on"
    unrestored = optsearch.apply(tiny_pipe, setting_for(("deepcache",)))  # a notebook's leftover
    try:
        with pytest.raises(ModelLoadError, match=r"comes with DeepCache \(DeepCacheSDHelper"):
            check_families(tiny_pipe, spec_from_dict({"model": {"id": "builtin:tiny"}}))
    finally:
        unrestored.restore()
    check_families(tiny_pipe, spec_from_dict({"model": {"id": "builtin:tiny"}}))  # plain again
    assert np.array_equal(generate_images(tiny_pipe, PROMPTS), baseline)


@pytest.mark.parametrize("bad, message", [
    ({"tome": {"ratio": 1.0}}, "must be < 1.0"),
    ({"deepcache": {"cache_interval": 0}}, "must be >= 1"),
    ({"foo": {"x": 1}}, "unknown accelerator"),
    ({"tome": {"speed": 1}}, "unknown parameter"),
    ({"tome": {"ratio": "high"}}, "must be a number"),
])
def test_normalize_setting_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        normalize_setting(bad)


def test_normalize_setting_accepts_flat_and_nested_and_orders():
    flat = normalize_setting({"tgate.gate_step": 10, "deepcache.cache_interval": 3})
    assert list(flat) == ["deepcache", "tgate"]
    assert flat == {"deepcache": {"cache_interval": 3}, "tgate": {"gate_step": 10}}


def test_public_apply_accepts_dict_and_export_file(tiny_pipe, tmp_path, baseline):
    setting = setting_for(("deepcache", "tome"))
    with optsearch.apply(tiny_pipe, setting) as applied:
        from_dict = generate_images(applied, PROMPTS, reseed=applied.reseed)
    path = tmp_path / "search_params.json"
    path.write_text(json.dumps({"best": {"setting": setting}}))
    with optsearch.apply(tiny_pipe, path) as applied:
        from_file = generate_images(applied, PROMPTS, reseed=applied.reseed)
    assert np.array_equal(from_dict, from_file)
    assert np.array_equal(generate_images(tiny_pipe, PROMPTS), baseline)


def test_sdxl_all_three_change_repeat_and_restore(tiny_xl_pipe):
    base = generate_images(tiny_xl_pipe, PROMPTS[:2])
    applied = AppliedSetting(tiny_xl_pipe, setting_for(("deepcache", "tome", "tgate")))
    first = generate_images(applied, PROMPTS[:2], reseed=applied.reseed)
    second = generate_images(applied, PROMPTS[:2], reseed=applied.reseed)
    applied.restore()
    assert np.abs(first - base).max() > 1e-3
    assert np.array_equal(first, second)
    assert np.array_equal(generate_images(tiny_xl_pipe, PROMPTS[:2]), base)


def test_unet_caches_report_the_share_of_the_unet_they_ran(tiny_pipe):
    """DeepCache counts only the layers that computed (weighed by their work), T-GATE the UNet
    rows after it drops guidance's unconditional half; one full pass every step reads 1.0."""
    def fraction(setting):
        with AppliedSetting(tiny_pipe, setting) as applied:
            generate_images(applied, PROMPTS[:2], reseed=applied.reseed)
            return applied.computed_fraction()

    every_step = fraction({"deepcache": {"cache_interval": 1, "cache_branch_id": 0}})
    shallow = fraction({"deepcache": {"cache_interval": 5, "cache_branch_id": 0}})
    deeper = fraction({"deepcache": {"cache_interval": 5, "cache_branch_id": 3}})
    assert every_step == pytest.approx(1.0)
    assert 0.2 < shallow < deeper < 1.0, (shallow, deeper)  # 2 full passes of 10, then the rest
    assert fraction({"tgate": {"gate_step": 4}}) == pytest.approx((4 * 2 + 6) / 20)
    # T-GATE restarts DeepCache at steps 3 and 4: full passes at 0, 3, 4, 9 (2, 2, 1, 1 rows);
    # cached passes at 1, 2 (2 rows), 5-8 (1 row) compute the shallow share s of the work.
    shallow_share = (10 * shallow - 2) / 8
    both = fraction({"deepcache": {"cache_interval": 5, "cache_branch_id": 0},
                     "tgate": {"gate_step": 4}})
    assert both == pytest.approx((6 + 8 * shallow_share) / 20, rel=1e-6)
    assert fraction({"tome": {"ratio": 0.5, "max_downsample": 1}}) is None  # ToMe claims nothing


def test_apply_of_an_export_warns_once_when_served_at_another_context(tiny_pipe, tmp_path):
    """The export records the batch size, size, steps and guidance its figures hold for; served
    otherwise, `optsearch.apply` says so (once per item), and says nothing when served as measured."""
    import warnings

    exported = {"best": {"setting": {"deepcache": SETTINGS["deepcache"]}},
                "deployment": {"batch_size": 2, "height": None, "width": None,
                               "num_inference_steps": 10, "guidance_scale": 7.5, "num_frames": None,
                               "compile": "none"}}
    path = tmp_path / "search_params.json"
    path.write_text(json.dumps(exported))
    with optsearch.apply(tiny_pipe, path) as run, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        generate_images(run, PROMPTS[:2], steps=10)
        assert not said, [str(w.message) for w in said]
        generate_images(run, PROMPTS, steps=6)
        generate_images(run, PROMPTS, steps=6)
    messages = sorted(str(w.message) for w in said)
    assert len(messages) == 2, messages
    assert "measured at batch_size = 2; called with 3" in messages[0]
    assert "measured at num_inference_steps = 10; called with 6" in messages[1]
    # measured on another GPU in another dtype: a speedup is the device's, so it says so
    exported["deployment"].update(device="NVIDIA H100 80GB HBM3", dtype="float16")
    with optsearch.apply(tiny_pipe, exported) as run, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        generate_images(run, PROMPTS[:2], steps=10)
    messages = sorted(str(w.message) for w in said)
    assert len(messages) == 2, messages
    assert "measured at device = NVIDIA H100 80GB HBM3; called with cpu:" in messages[0]
    assert "measured at dtype = float16; called with float32" in messages[1]


def test_apply_warns_when_served_at_another_size_than_the_native_one_measured(tiny_pipe):
    """A spec that leaves the size to the pipeline is measured at its native size (32x32 here),
    which the export records: a call at that size, given or left out, is as measured; a call
    at another size, the figure that moves a cache's speedup most, warns."""
    import warnings

    exported = {"best": {"setting": {"deepcache": SETTINGS["deepcache"]}},
                "deployment": {"batch_size": 2, "height": 32, "width": 32,
                               "num_inference_steps": 10}}
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    with optsearch.apply(tiny_pipe, exported) as run, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        generate_images(run, PROMPTS[:2], steps=10)  # size left out: native
        run(PROMPTS[:2], num_inference_steps=10, height=32, width=32, output_type="np",
            generator=generators)
        assert not said, [str(w.message) for w in said]
        run(PROMPTS[:2], num_inference_steps=10, height=64, width=48, output_type="np",
            generator=generators)
    messages = sorted(str(w.message) for w in said)
    assert len(messages) == 2, messages
    assert "measured at height = 32; called with 64" in messages[0]
    assert "measured at width = 32; called with 48" in messages[1]
    # measured at a size the spec set, served at the native one (the size left out): warns
    exported["deployment"].update(height=64, width=64)
    with optsearch.apply(tiny_pipe, exported) as run, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        generate_images(run, PROMPTS[:2], steps=10)
    assert sorted(str(w.message) for w in said)[0].startswith(
        "optsearch: this setting was measured at height = 64; called with 32")


def test_qwen_images_true_cfg_is_part_of_the_context_measured_and_served():
    """Qwen-Image's true CFG runs the transformer twice a step: a setting measured at
    true_cfg_scale 4.0 and served at 1.0 (one pass) does not hold its figures, so the export
    records it, check prints it, and apply warns."""
    import warnings

    from optsearch.deployment import context_text, measured_context
    from optsearch.measure.builtin import build_builtin
    from optsearch.study_spec import spec_from_dict

    spec = spec_from_dict({"model": {"id": "builtin:tiny-qwen-image", "steps": 4, "guidance_scale": 1.0,
                                     "true_cfg_scale": 4.0, "negative_prompt": " "},
                           "search": {"accelerators": [["steps"]]}})
    measured = measured_context(spec, 1)
    assert measured["true_cfg_scale"] == 4.0
    assert "guidance 1.0, true CFG 4.0" in context_text(measured)
    plain = spec_from_dict({"model": {"id": "builtin:tiny"}, "search": {"accelerators": ["deepcache"]}})
    assert "true_cfg_scale" not in measured_context(plain, 1)  # other studies' contexts unchanged
    pipe = build_builtin("builtin:tiny-qwen-image")
    exported = {"best": {"setting": {"steps": {"num_inference_steps": 2}}}, "deployment": measured}

    def said_when_called(exported, **call) -> list[str]:
        with optsearch.apply(pipe, exported) as run, warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            run(PROMPTS[:1], num_inference_steps=4, guidance_scale=1.0, height=128, width=128,
                output_type="np", **call)
        return [str(w.message) for w in said if "optsearch" in str(w.message)]

    assert said_when_called(exported, true_cfg_scale=4.0, negative_prompt=" ") == []
    assert said_when_called(exported, true_cfg_scale=1.0) == [
        "optsearch: this setting was measured at true_cfg_scale = 4.0; called with 1.0, its speedup "
        "and quality may differ (search again at true_cfg_scale = 1.0 to know)"]
    assert said_when_called(exported, negative_prompt=" ") == []  # the pipeline's default: 4.0
    # 4.0 without a negative prompt runs no true CFG (one pass): the scale that ran is 1.0
    assert said_when_called(exported, true_cfg_scale=4.0) == [
        "optsearch: this setting was measured at true_cfg_scale = 4.0; called with 1.0, its speedup "
        "and quality may differ (search again at true_cfg_scale = 1.0 to know)"]
    # a spec that sets neither runs 1.0 (optsearch passes it): the baseline records it, so a
    # server that adds the card's negative prompt (two passes at the default 4.0) is told
    from optsearch.measure.generation import GenerationConfig

    bare = spec_from_dict({"model": {"id": "builtin:tiny-qwen-image", "steps": 4, "guidance_scale": 1.0},
                           "search": {"accelerators": [["steps"]]}})
    negative_only = spec_from_dict({"model": {"id": "builtin:tiny-qwen-image", "steps": 4,
                                              "negative_prompt": " "},
                                    "search": {"accelerators": [["steps"]]}})
    assert [GenerationConfig.from_spec(s).true_cfg_ran(pipe) for s in (spec, bare, negative_only)] \
        == [4.0, 1.0, 4.0]
    assert GenerationConfig.from_spec(plain).true_cfg_ran(build_builtin("builtin:tiny")) is None
    one_pass = {**exported, "deployment": measured_context(bare, 1, true_cfg_scale=1.0)}
    assert one_pass["deployment"]["true_cfg_scale"] == 1.0
    assert "true CFG" not in context_text(one_pass["deployment"])  # one pass: plain guidance 1.0
    assert said_when_called(one_pass) == []
    assert said_when_called(one_pass, negative_prompt=" ") == [
        "optsearch: this setting was measured at true_cfg_scale = 1.0; called with 4.0, its speedup "
        "and quality may differ (search again at true_cfg_scale = 4.0 to know)"]


def test_apply_names_a_file_that_is_not_an_export_and_takes_a_setting_file(tiny_pipe, tmp_path):
    """The other export formats deploy without optsearch: handed to `apply` by mistake, each is
    named with how it loads, not a JSON decoder's 'Expecting value: line 1 column 1'. A JSON file
    of a bare setting applies as the dict would."""
    (tmp_path / "accelerate_pipe.py").write_text("def accelerate(pipe):\n    return {}\n")
    (tmp_path / "cache.yaml").write_text("cache_config:\n  max_warmup_steps: 4\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    expected = {"accelerate_pipe.py": "(a Python export: import it and call its accelerate(pipe))",
                "cache.yaml": "(cache-dit's YAML: cache_dit.enable_cache(pipe, "
                              "**cache_dit.load_configs(path)))",
                "list.json": "(it holds a JSON list, not an object)"}
    for name, why in expected.items():
        with pytest.raises(ValueError, match="is not a search_params.json") as raised:
            optsearch.apply(tiny_pipe, tmp_path / name)
        assert why in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=r"the export has no best setting \(`best.setting`\)"):
        optsearch.apply(tiny_pipe, {"best": {}})
    with pytest.raises(FileNotFoundError, match="missing.json: no such search_params.json"):
        optsearch.apply(tiny_pipe, tmp_path / "missing.json")
    for wrong in (None, 42, ["deepcache"]):  # not "expected str, bytes or os.PathLike object"
        with pytest.raises(TypeError, match=f"params is a {type(wrong).__name__}; pass the path of"):
            optsearch.apply(tiny_pipe, wrong)
    (tmp_path / "setting.json").write_text(json.dumps({"deepcache": SETTINGS["deepcache"]}))
    plain = generate_images(tiny_pipe, PROMPTS[:2])
    with optsearch.apply(tiny_pipe, tmp_path / "setting.json") as run:
        from_file = generate_images(run, PROMPTS[:2])
    with optsearch.apply(tiny_pipe, {"deepcache": SETTINGS["deepcache"]}) as run:
        from_dict = generate_images(run, PROMPTS[:2])
    assert np.array_equal(from_file, from_dict) and not np.allclose(from_file, plain)


@pytest.mark.parametrize("wrong, why", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "str, not a diffusers pipeline with a unet or "
     "transformer: a model id or path; load the pipeline first"),
    (None, "NoneType, not a diffusers pipeline with a unet or transformer"),
])
def test_apply_and_search_name_what_was_handed_in_instead_of_a_pipeline(wrong, why, tiny_pipe,
                                                                        tmp_path):
    """A model id, None, or the denoiser itself (pipe.unet) is a TypeError saying what it is,
    before the spec's prompts or the storage are opened, not "'str' object has no attribute
    'transformer'"."""
    for call in (lambda: optsearch.apply(wrong, {"deepcache": SETTINGS["deepcache"]}),
                 lambda: optsearch.search(wrong, tmp_path / "absent.toml",
                                          storage=f"sqlite:///{tmp_path / 's.db'}")):
        with pytest.raises(TypeError, match="^optsearch: got ") as raised:
            call()
        assert why in str(raised.value)
    with pytest.raises(TypeError, match=r"UNet2DConditionModel, not a diffusers pipeline .*: a "
                       r"network, not the pipeline that runs it; pass the pipeline \(pipe, not "
                       r"pipe.unet\)"):
        optsearch.apply(tiny_pipe.unet, {"deepcache": SETTINGS["deepcache"]})
    assert not (tmp_path / "s.db").exists()


def test_search_names_a_spec_of_another_type(tiny_pipe, tmp_path):
    """A spec that is neither a StudySpec, a dict nor a path: what search takes, not "expected
    str, bytes or os.PathLike object, not int"; and nothing is written."""
    with pytest.raises(TypeError, match="optsearch.search: spec is a int; pass a StudySpec, a spec dict"):
        optsearch.search(tiny_pipe, 5, storage=f"sqlite:///{tmp_path / 's.db'}")
    # a LoRA or ControlNet for optsearch to load: the pipeline passed is measured as it is, so
    # the study would record a LoRA it never ran
    for key in ("lora", "controlnet"):
        with pytest.raises(UsageError, match=f"model.{key} is for a pipeline optsearch loads"):
            optsearch.search(tiny_pipe, {"model": {"id": "./sd", key: "./x"}},
                             storage=f"sqlite:///{tmp_path / 's.db'}")
    assert not (tmp_path / "s.db").exists()
