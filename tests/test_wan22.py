"""Wan 2.2 A14B's two experts (builtin:tiny-wan22: a second transformer runs the low-noise
steps): both run, each cache acts on both as a server enables it on both, the exports do the
same; MagCache calibrates and runs each expert with its own ratios over its own steps;
TaylorSeer acts on Wan in its lite mode (its default identifiers hook no module of Wan, which is
refused in one line), and FasterCache's second expert computes its first step (diffusers' hooks
would reuse an empty cache there)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

import optsearch
from optsearch.accelerators import AppliedSetting, magcache, normalize_setting
from optsearch.measure.compiling import compile_denoiser, compiled_how
from optsearch.measure.models import load_pipeline
from optsearch.optimize.deploy import diffusers_python
from tests.conftest import optsearch_cmd, write_spec
from tests.test_deploy_exports import exported_function
from tests.test_seacache import STEPS, video
from tests.test_video import PROMPTS, WAN_SPEC

WAN22_SPEC = WAN_SPEC.replace('id = "builtin:tiny-wan"', 'id = "builtin:tiny-wan22"')


@pytest.fixture(scope="module")
def wan22():
    return load_pipeline("builtin:tiny-wan22", device="cpu", dtype="float32")


class AttentionCalls:
    """How often each expert's last block computed its self-attention's query: a cache that
    skips the block, or broadcasts or reuses the attention, leaves it out."""

    def __init__(self, pipe):
        self.counts = [0, 0]
        self.handles = [expert.blocks[-1].attn1.to_q.register_forward_pre_hook(
            lambda *_, index=index: self.counts.__setitem__(index, self.counts[index] + 1))
            for index, expert in enumerate((pipe.transformer, pipe.transformer_2))]

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for handle in self.handles:
            handle.remove()


def test_both_experts_run_each_its_share_of_the_steps(wan22):
    with AttentionCalls(wan22) as calls:
        video(wan22)
    assert all(calls.counts) and sum(calls.counts) == 2 * STEPS  # guidance: two calls a step


# TaylorSeer-Lite: each expert's blocks skip on a schedule of its own steps (3 and 5 of 8 here)
TAYLORSEER_LITE = {"cache_interval": 2, "disable_cache_before_step": 1, "use_lite_mode": True}
CACHES = [{"fbcache": {"threshold": 0.3}},
          {"pab": {"spatial_attention_block_skip_range": 2, "timestep_skip_high": 1000}},
          {"seacache": {"threshold": 2.0, "max_consecutive_cached": 3}},
          {"dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1}},
          {"taylorseer": TAYLORSEER_LITE},
          # the window holds both experts' steps: each reuses, the second from its second step
          {"fastercache": {"spatial_attention_block_skip_range": 3, "timestep_skip_high": 1000}}]


@pytest.mark.parametrize("setting", CACHES, ids=[next(iter(s)) for s in CACHES])
def test_each_cache_acts_on_both_experts_and_restores_both(wan22, setting):
    """Each expert's attention runs fewer times than without the cache (before, the second
    expert, which runs the low-noise steps, ran in full); after, the plain video bit for bit."""
    with AttentionCalls(wan22) as plain_calls:
        plain = video(wan22)
    with optsearch.apply(wan22, setting) as run, AttentionCalls(wan22) as calls:
        cached = video(run)
    assert calls.counts[0] < plain_calls.counts[0] and calls.counts[1] < plain_calls.counts[1], \
        (calls.counts, plain_calls.counts)
    assert not np.array_equal(cached, plain)
    assert not any(expert.is_cache_enabled for expert in (wan22.transformer, wan22.transformer_2))
    assert np.array_equal(video(wan22), plain)


@pytest.mark.parametrize("setting", [
    {"fbcache": {"threshold": 0.3}}, {"taylorseer": TAYLORSEER_LITE},
    {"fastercache": {"spatial_attention_block_skip_range": 3, "timestep_skip_high": 1000,
                     "unconditional_batch_skip_range": 5}}],  # a study's setting names every one
    ids=["fbcache", "taylorseer-lite", "fastercache"])
def test_the_python_export_enables_the_cache_on_both_experts(wan22, setting):
    with optsearch.apply(wan22, setting) as run:
        ours = video(run)
    exported = {"study": "tiny-wan22", "metric": "psnr", "spec": {"model": {"steps": STEPS}},
                "best": {"trial": 0, "setting": setting, "metrics": {}, "confirmed": None}}
    exported_function(diffusers_python(exported))(wan22)
    try:
        assert wan22.transformer.is_cache_enabled and wan22.transformer_2.is_cache_enabled
        assert np.array_equal(video(wan22), ours)
    finally:
        wan22.transformer.disable_cache()
        wan22.transformer_2.disable_cache()


WITHOUT_BOUNDARY = """
from optsearch.measure.builtin import build_builtin


def build(device, dtype):
    \"\"\"Wan 2.2's two experts with no boundary: the pipeline would never run the second.\"\"\"
    pipe = build_builtin("builtin:tiny-wan22")
    pipe.register_to_config(boundary_ratio=None)
    return pipe  # float32 on the CPU, as the test asks
"""


def test_any_on_two_experts_checks_clean_and_a_family_one_refuses_names_the_list_instead(tmp_path):
    """"any" is the video kind's combos, fixed before loading: on Wan 2.2 A14B every one applies
    (FasterCache, TaylorSeer and MagCache act on both experts). Where some are refused (two
    experts and no boundary: MagCache and FasterCache cannot tell the second expert's steps),
    the one line names the list of those that apply."""
    spec = write_spec(tmp_path / "wan22.toml", WAN22_SPEC.replace(
        '[["steps"], ["pab"], ["fastercache"]]', '"any"'))
    result = optsearch_cmd("check", str(spec))
    assert result.returncode == 0, result.stderr
    (tmp_path / "my_wan.py").write_text(WITHOUT_BOUNDARY)
    spec.write_text(spec.read_text().replace('id = "builtin:tiny-wan22"',
                                             'id = "my_wan:build"\nkind = "video"'))
    result = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    instead = '[["steps"], ["pab"], ["fbcache"], ["taylorseer"], ["dbcache"]]'
    assert f'"any" includes fastercache: write search.accelerators = {instead}' in result.stderr


def test_a_taylorseer_study_on_wan_runs_in_lite_mode(tmp_path):
    """In full mode TaylorSeer hooks nothing of Wan (diffusers' identifiers name modules like
    "blocks.N.attn"; Wan's are attn1/attn2): a study that asks for it is refused with the way out.
    By default a video study runs lite mode: every trial records it (what its export writes:
    test_the_python_export_enables_the_cache_on_both_experts) and skips blocks on TaylorSeer's
    schedule. (No export here: at batch 1 tiny-wan's lite trials read 0.94-1.10x, so a winner
    faster than the baseline is not certain.)"""
    from optsearch.accelerators import taylorseer

    text = WAN_SPEC.replace('[["steps"], ["pab"], ["fastercache"]]', '[["taylorseer"]]').replace(
        "limit = 30.0", "limit = 5.0") + "\n[space.taylorseer]\n"
    spec = write_spec(tmp_path / "wan.toml", text + "use_lite_mode = false\n")
    refused = optsearch_cmd("check", str(spec))
    assert refused.returncode == 2 and "use_lite_mode = true ([space.taylorseer] in a spec)" in refused.stderr
    wan = load_pipeline("builtin:tiny-wan", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="taylorseer hooks no module of WanTransformer3DModel"):
        optsearch.apply(wan, {"taylorseer": {"use_lite_mode": False}})
    with optsearch.apply(wan, {"taylorseer": {}}):  # the library's default follows the kind, too
        assert wan.transformer._cache_config.use_lite_mode is True
    spec.write_text(text)  # on a video pipeline lite mode is the default
    url = f"sqlite:///{tmp_path / 's.db'}"
    result = optsearch_cmd("run", str(spec), "--storage", url, "--n-trials", "2", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    finished = [t for t in optuna.load_study(study_name="tiny-wan", storage=url).trials
                if t.state == optuna.trial.TrialState.COMPLETE]
    assert finished
    for trial in finished:
        params = normalize_setting(trial.user_attrs["setting"])["taylorseer"]
        assert params["use_lite_mode"] is True
        assert trial.user_attrs["compute_fraction"] == pytest.approx(taylorseer.computed_steps(
            16, params["cache_interval"], params["disable_cache_before_step"]) / 16)


@pytest.mark.parametrize("setting, steps", [
    ({"taylorseer": TAYLORSEER_LITE}, STEPS), ({"taylorseer": TAYLORSEER_LITE}, 5),
    ({"fastercache": {"spatial_attention_block_skip_range": 3, "timestep_skip_high": 1000}}, STEPS)],
    ids=["taylorseer-lite-8", "taylorseer-lite-5", "fastercache"])
def test_a_compiled_pair_of_experts_is_told_the_share_its_hooks_count_on_an_eager_pair(setting, steps):
    """Each expert's hooks decide over that expert's own calls: on a compiled pair (where counting
    would change the graphs) TaylorSeer replays its schedule over the experts' split of the steps,
    and FasterCache reads its reused calls from the measured timesteps (the second expert's first
    step computing); both equal what the hooks count on an eager pair."""
    from optsearch.accelerators import pab

    pipe = load_pipeline("builtin:tiny-wan22", device="cpu", dtype="float32")
    measured = {"fastercache": pab.measure_timesteps(
        pipe, steps, lambda: video(pipe, num_inference_steps=steps))}
    with AppliedSetting(pipe, setting, measured) as run:
        video(run, num_inference_steps=steps)
        counted = run.computed_fraction()
    compile_denoiser(pipe, "regional", backend="eager")
    with AppliedSetting(pipe, setting, measured) as run:
        video(run, num_inference_steps=steps)
        told = run.computed_fraction()
        assert not run._patches[0].patch.counting  # told, not counted
    assert 0 < counted < 1 and told == pytest.approx(counted)


@pytest.fixture(scope="module")
def expert_ratios(wan22):
    return magcache.measure(wan22, STEPS, lambda: video(wan22))


@pytest.mark.parametrize("steps", [STEPS, 5])
def test_magcache_skips_on_each_expert_what_its_own_ratios_tell(wan22, expert_ratios, steps):
    """Each expert is calibrated over the steps it runs (3 and 5 of 8 at boundary 0.875), and a
    call of any step count skips, on both, exactly the steps the replay of diffusers' decision on
    each expert's ratios tells (counted in the call: what `computation` keys twins by)."""
    first = expert_ratios["first_expert_steps"]
    assert len(first) == STEPS and 0 < first[STEPS - 1] < STEPS
    assert (len(expert_ratios["mag_ratios"]), len(expert_ratios["mag_ratios_2"])) == \
        (first[STEPS - 1], STEPS - first[STEPS - 1])
    low, high = magcache.range_for(expert_ratios, {"max_skip_steps": 2, "retention_ratio": 0.0}, steps)
    params = {"threshold": (low + high) / 2, "max_skip_steps": 2, "retention_ratio": 0.0}
    skipped = magcache.call_skips(expert_ratios, steps, params)
    assert any(step < first[steps - 1] for step in skipped) and \
        any(step >= first[steps - 1] for step in skipped), skipped  # both experts skip
    plain = video(wan22, num_inference_steps=steps)
    with AppliedSetting(wan22, {"magcache": params}, {"magcache": expert_ratios}) as run:
        cached = video(run, num_inference_steps=steps)
        assert run.computed_fraction() == pytest.approx(1 - len(skipped) / steps)
    assert not np.array_equal(cached, plain)
    assert not any(expert.is_cache_enabled for expert in (wan22.transformer, wan22.transformer_2))
    assert np.array_equal(video(wan22, num_inference_steps=steps), plain)


def test_magcache_ratios_of_one_network_are_refused_on_two_experts(wan22, expert_ratios):
    with pytest.raises(ValueError, match=r"measured on one transformer; this pipeline runs two "
                                         r"experts \(transformer_2\)"):
        AppliedSetting(wan22, {"magcache": {}}, {"magcache": {"mag_ratios": [1.0] * STEPS}})
    assert not any(expert.is_cache_enabled for expert in (wan22.transformer, wan22.transformer_2))
    one = load_pipeline("builtin:tiny-wan", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="measured on two experts; this pipeline runs one transformer"):
        AppliedSetting(one, {"magcache": {}}, {"magcache": expert_ratios})
    assert not one.transformer.is_cache_enabled


def test_the_python_export_enables_magcache_on_each_expert_with_its_own_ratios(wan22, expert_ratios):
    setting = {"magcache": {"threshold": 0.02, "max_skip_steps": 2, "retention_ratio": 0.0}}
    with AppliedSetting(wan22, setting, {"magcache": expert_ratios}) as run:
        ours = video(run)
    exported = {"study": "tiny-wan22", "metric": "psnr", "spec": {"model": {"steps": STEPS}},
                "calibration": {"magcache": expert_ratios},
                "best": {"trial": 0, "setting": setting, "metrics": {}, "confirmed": None}}
    code = diffusers_python(exported)
    assert f"of {STEPS} steps the first expert runs {expert_ratios['first_expert_steps'][-1]}" in code
    exported_function(code)(wan22)
    try:
        assert wan22.transformer._cache_config.mag_ratios.tolist() == \
            pytest.approx(expert_ratios["mag_ratios"])
        assert wan22.transformer_2._cache_config.mag_ratios.tolist() == \
            pytest.approx(expert_ratios["mag_ratios_2"])
        assert np.array_equal(video(wan22), ours)
    finally:
        wan22.transformer.disable_cache()
        wan22.transformer_2.disable_cache()
    unsplit = {key: value for key, value in expert_ratios.items() if key != "first_expert_steps"}
    with AppliedSetting(wan22, setting, {"magcache": unsplit}) as run:  # split from the pipeline
        assert np.array_equal(video(run), ours)
    with optsearch.apply(wan22, exported) as run:  # the export's dict, through optsearch
        assert np.array_equal(video(run), ours)
        video(run, num_inference_steps=STEPS + 2)  # served at more steps than measured: split anew
        assert run.computed_fraction() == pytest.approx(1 - len(magcache.call_skips(
            {**expert_ratios, "first_expert_steps": magcache.first_expert_steps(wan22, STEPS + 2)},
            STEPS + 2, setting["magcache"])) / (STEPS + 2))


def test_a_study_of_two_experts_compiles_both():
    pipe = load_pipeline("builtin:tiny-wan22", device="cpu", dtype="float32")
    compile_denoiser(pipe, "regional", backend="eager")
    assert compiled_how(pipe.transformer) == compiled_how(pipe.transformer_2) == "regional"


def test_pab_is_keyed_by_the_calls_each_expert_broadcasts_at(wan22):
    """Each expert's attention hooks count that expert's own calls: the second expert computes at
    its first call, whatever its index in the whole run. The key's broadcast calls are exactly the
    calls whose attention did not run."""
    from optsearch.accelerators import canonical_setting, pab

    measured = pab.measure_timesteps(wan22, STEPS, lambda: video(wan22))
    assert sorted(set(measured["experts"])) == [0, 1] and measured["experts"][0] == 0
    setting = {"pab": {"spatial_attention_block_skip_range": 4, "timestep_skip_high": 1000}}
    key = canonical_setting(setting, STEPS, {"pab": measured})["pab"]["broadcast_calls"]
    ran: list[bool] = []  # per denoiser call: did the last block's attention compute?
    hooks = [expert.register_forward_pre_hook(lambda *_: ran.append(False))
             for expert in (wan22.transformer, wan22.transformer_2)]
    hooks += [expert.blocks[-1].attn1.to_q.register_forward_pre_hook(
        lambda *_: ran.__setitem__(-1, True)) for expert in (wan22.transformer, wan22.transformer_2)]
    try:
        with optsearch.apply(wan22, setting) as run:
            run(PROMPTS[:1], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))
    finally:
        for hook in hooks:
            hook.remove()
    second = measured["experts"].index(1)
    assert second % 4 != 0 and ran[second]  # its own first call: computed
    assert [call for call, computed in enumerate(ran) if not computed] == key


def test_the_second_experts_guidance_is_served_as_the_spec_says(tmp_path, wan22):
    """`model.guidance_scale_2` (Wan 2.2 A14B's card serves 4.0 and 3.0) reaches every call, and
    the deployment context says it; on one expert, or on an image model, it is one line, exit 2."""
    from optsearch.measure.generation import GenerationConfig, generate

    def frames(config: GenerationConfig) -> np.ndarray:
        return np.concatenate([b.images for b in generate(wan22, PROMPTS[:1], config, warmup=False)])

    config = GenerationConfig(steps=STEPS, guidance_scale=5.0, batch_size=1, num_frames=9)
    assert not np.array_equal(frames(config), frames(GenerationConfig(
        steps=STEPS, guidance_scale=5.0, batch_size=1, num_frames=9, guidance_scale_2=1.5)))
    text = WAN22_SPEC.replace("guidance_scale = 5.0", "guidance_scale = 5.0\nguidance_scale_2 = 3.0") \
        .replace('[["steps"], ["pab"], ["fastercache"]]', '[["steps"], ["pab"]]')
    checked = optsearch_cmd("check", str(write_spec(tmp_path / "two.toml", text)))
    assert checked.returncode == 0, checked.stderr
    assert "16 steps (FlowMatchEulerDiscreteScheduler), guidance 5.0 (3.0 on the second expert)" \
        in checked.stdout
    one = optsearch_cmd("check", str(write_spec(tmp_path / "one.toml", text.replace(
        'id = "builtin:tiny-wan22"', 'id = "builtin:tiny-wan"'))))
    assert one.returncode == 2 and len(one.stderr.strip().splitlines()) == 1, one.stderr
    assert "model.guidance_scale_2 applies to a second expert" in one.stderr
    image = optsearch_cmd("check", str(write_spec(tmp_path / "image.toml", text.replace(
        'id = "builtin:tiny-wan22"', 'id = "builtin:tiny"').replace("num_frames = 9\n", ""))))
    assert image.returncode == 2 and "model.guidance_scale_2: applies to Wan 2.2's two-expert" \
        in image.stderr


def test_a_magcache_study_of_two_experts_records_and_exports_each_experts_ratios(tmp_path):
    """The worker calibrates both experts once, each trial records the ratios it ran with and
    computes what the per-expert replay tells, and the export enables each expert with its own."""
    spec = write_spec(tmp_path / "wan22.toml", WAN22_SPEC.replace(
        '[["steps"], ["pab"], ["fastercache"]]', '[["magcache"]]').replace("limit = 30.0", "limit = 5.0")
        + '[space.magcache]\nthreshold = "auto"\nmax_skip_steps = [1, 3]\n')
    url = f"sqlite:///{tmp_path / 's.db'}"
    result = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="tiny-wan", storage=url)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert finished
    for trial in finished:
        used = trial.user_attrs["calibration_used"]["magcache"]
        assert len(used["mag_ratios"]) + len(used["mag_ratios_2"]) == 16
        params = normalize_setting(trial.user_attrs["setting"])["magcache"]
        assert trial.user_attrs["compute_fraction"] == pytest.approx(  # both experts' skips, replayed
            1 - len(magcache.call_skips(used, 16, params)) / 16)
    exported = optsearch_cmd("study", "export", "tiny-wan", "--storage", url, "--format", "diffusers",
                             "-o", "accelerate_pipe.py", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    code = (tmp_path / "accelerate_pipe.py").read_text()
    assert "pipe.transformer.enable_cache(MagCacheConfig(" in code
    assert "pipe.transformer_2.enable_cache(MagCacheConfig(" in code
